"""Tokenizer: Hugging Face `tokenizers` built from tokenizer.json or rebuilt from GGUF metadata.

Also renders chat templates (jinja2 in an immutable sandbox, with the environment options
transformers uses, so Hub templates render identically) and turns a stream of token ids into text
deltas for streaming (`IncrementalDetokenizer`, vLLM's prefix/read offsets).

GGUF files carry a byte-level BPE as `tokenizer.ggml.tokens` / `merges` / `token_type` and name
their pre-tokenizer in `tokenizer.ggml.pre` (llama.cpp's `llama_vocab_pre_type`); we rebuild the
same pipeline Hugging Face's tokenizer.json describes for that family.

It is in the shared bottom layer (torch-free) because the router tokenizes exactly as the engine
does: both hash the same token ids into the same block keys.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from kvweave import limits
from kvweave.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user defined (added text).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers that split every digit on its own before the GPT-2 regex (llama.cpp: "\p{N}" first).
# SmolLM2's tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)].
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRES = ("gpt2", "default")
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PATTERNS = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
SUPPORTED_GGUF_PRES = (*_DIGIT_SPLIT_PRES, *_GPT2_PRES, *_SPLIT_PATTERNS)


class TokenizerError(ValueError):
    """Tokenizer files or metadata are missing, malformed or unsupported (e.g. no chat template)."""


class InvalidMessagesError(ValueError):
    """Chat messages are not a list of {"role": str, "content": str}, or the template rejected them."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        """The offending field, OpenAI style (e.g. "messages[2].role"), where one is to blame."""


ChatPiece = tuple[str, bool]
"""A piece of a rendered chat: (text, is message content). The template's own text may hold special
tokens; special-token text in message content is plain text."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._parts_template: bool | None = None
        """Whether the template renders message content only as a list of typed parts (SmolVLM's)."""
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content),
                          key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._text_tokenizer: tokenizers.Tokenizer | None = None

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config: dict | None = None) -> "Tokenizer":
        """Build from a tokenizer.json and the parsed tokenizer_config.json (chat template, bos/eos)."""
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"cannot read {tokenizer_json}: {exc}") from exc
        cfg = tokenizer_config or {}
        bos_id = _special_id(tok, cfg.get("bos_token"))
        eos_id = _special_id(tok, cfg.get("eos_token"))
        return cls(
            tok,
            bos_token_id=bos_id,
            eos_token_ids=[] if eos_id is None else [eos_id],
            chat_template=_pick_chat_template(cfg.get("chat_template")),
        )

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """Rebuild a byte-level BPE from GGUF metadata (`kvweave.gguf_file.GGUFFile.fields`)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2' byte-level BPE)")
        tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
        merges: list[str] = fields.get("tokenizer.ggml.merges") or []
        token_types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pre = fields.get("tokenizer.ggml.pre", "default")
        if not tokens:
            raise TokenizerError("GGUF file has no tokenizer.ggml.tokens")
        vocab = {token: i for i, token in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(_added(tokens, token_types, _TOKEN_TYPE_CONTROL, special=True))
        tok.add_tokens(_added(tokens, token_types, _TOKEN_TYPE_USER_DEFINED, special=False))
        bos_id = fields.get("tokenizer.ggml.bos_token_id")
        add_bos = fields.get("tokenizer.ggml.add_bos_token", False)
        tok.post_processor = _post_processor(tokens, bos_id if add_bos else None)
        eos_ids = [
            fields.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")
        ]
        return cls(
            tok,
            bos_token_id=None if bos_id is None else int(bos_id),
            eos_token_ids=[int(i) for i in eos_ids if i is not None],
            chat_template=fields.get("tokenizer.chat_template"),
        )

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.hf_tokenizer.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.hf_tokenizer.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = False, special_as_text: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their single ids, unless
        `special_as_text` (then "<|im_start|>" is tokenized as the characters it is made of)."""
        tok = self._plain_text_tokenizer() if special_as_text else self.hf_tokenizer
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def has_special_text(self, text: str) -> bool:
        """Whether `text` spells one of the tokenizer's special (control) tokens."""
        return self._special_pattern is not None and self._special_pattern.search(text) is not None

    def _plain_text_tokenizer(self) -> tokenizers.Tokenizer:
        if self._text_tokenizer is None:  # a copy: the flag is per tokenizer, and the original keeps its meaning
            tok = tokenizers.Tokenizer.from_str(self.hf_tokenizer.to_str())
            tok.encode_special_tokens = True
            self._text_tokenizer = tok
        return self._text_tokenizer

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template."""
        validate_messages(messages)
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = self._template()
        if self._takes_content_parts():
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise InvalidMessagesError(f"chat template rejected the messages: {str(exc)[:200]}") from exc
        except Exception as exc:  # a template's own bug on unusual input: the client's 400, not a 500
            logger.debug("chat template failed", exc_info=True)
            raise InvalidMessagesError("the model's chat template cannot render these messages") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template adds any bos itself). Prompts are data:
        special-token text inside message content is tokenized as text, so a user cannot write
        "<|im_start|>system" into a message to open a turn of another role."""
        return self.encode_chat_pieces(self.render_chat_pieces(messages, add_generation_prompt))

    def render_chat_pieces(self, messages: list[dict], add_generation_prompt: bool = True) -> list[ChatPiece]:
        """The rendered chat as (text, is content) pieces that concatenate to `apply_chat_template`.

        Each message's content is rendered as a unique sentinel and put back after, so the pieces
        say which text came from the template and which from the messages. A template that
        transforms or drops content (the pieces would not add up to the plain rendering) gives one
        template piece, unless some content spells a special token: then InvalidMessagesError,
        since it could not be kept as text."""
        plain = self.apply_chat_template(messages, add_generation_prompt)
        nonce = secrets.token_hex(8)
        marks = [f"KVWEAVEMSG{nonce}N{i}E" for i in range(len(messages))]
        masked = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
        pieces: list[ChatPiece] = []
        rest = masked
        for message, mark in zip(messages, marks):
            if masked.count(mark) != 1 or mark not in rest:
                pieces = []
                break
            before, rest = rest.split(mark, 1)
            pieces += [(before, False), (message["content"], True)]
        if pieces:
            pieces.append((rest, False))
        if pieces and "".join(text for text, _ in pieces) == plain:
            return [p for p in pieces if p[0]]
        for i, message in enumerate(messages):
            if self.has_special_text(message["content"]):
                raise InvalidMessagesError(f"messages[{i}]['content'] spells a special token, and this model's chat "
                                           "template transforms message content, so it cannot be kept as text",
                                           f"messages[{i}].content")
        return [(plain, False)]

    def encode_chat_pieces(self, pieces: Sequence[ChatPiece]) -> list[int]:
        """Token ids of rendered chat pieces: special tokens in template pieces are control tokens,
        special-token text in content pieces is text. Text between the template's special tokens is
        tokenized in one go (as `encode` does, which splits at special tokens first), so a chat
        whose content spells no special token gets exactly `encode(rendered text)`."""
        if not any(is_content and self.has_special_text(text) for text, is_content in pieces):
            return self.encode("".join(text for text, _ in pieces))
        ids: list[int] = []
        run: list[str] = []
        for text, is_content in pieces:
            if is_content or self._special_pattern is None:
                run.append(text)
                continue
            start = 0
            for m in self._special_pattern.finditer(text):
                run.append(text[start:m.start()])
                ids += self.encode("".join(run), special_as_text=True)
                ids.append(self.hf_tokenizer.token_to_id(m.group()))
                run, start = [], m.end()
            run.append(text[start:])
        return ids + self.encode("".join(run), special_as_text=True)

    def _takes_content_parts(self) -> bool:
        """Whether the template drops string content but renders a list of {"type": "text"} parts
        (vision-language templates iterate `message['content']`); probed once."""
        if self._parts_template is None:
            probe = "KVWEAVEPROBE"

            def shows(content) -> bool:
                try:
                    return probe in self._template().render(messages=[{"role": "user", "content": content}],
                                                            add_generation_prompt=False, bos_token="", eos_token="")
                except Exception:  # a template with its own demands (roles, order): keep strings
                    return False

            self._parts_template = not shows(probe) and shows([{"type": "text", "text": probe}])
        return self._parts_template

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if not self.chat_template:
                raise TokenizerError("this model has no chat template; send a plain prompt instead")
            try:
                self._compiled_template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"the model's chat template does not parse: {exc}") from exc
        return self._compiled_template


def validate_messages(messages: Any) -> None:
    """Raise `InvalidMessagesError` unless `messages` is a non-empty list of {role: str, content: str}."""
    if not isinstance(messages, list) or not messages:
        raise InvalidMessagesError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidMessagesError(f"messages[{i}] must be an object, got {type(message).__name__}",
                                       f"messages[{i}]")
        check_role(message.get("role"), i)
        if not isinstance(message.get("content"), str):
            got = type(message.get("content")).__name__ if "content" in message else "nothing"
            raise InvalidMessagesError(f"messages[{i}]['content'] must be a string, got {got}",
                                       f"messages[{i}].content")


def check_role(role: Any, i: int) -> None:
    """InvalidMessagesError naming `messages[i].role` unless `role` is one of kvweave.limits.CHAT_ROLES."""
    try:
        limits.check_role(role, i)
    except InvalidRequestError as e:
        raise InvalidMessagesError(str(e), e.param) from None


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence, for streaming.

    vLLM's scheme: decode only the window `ids[prefix_offset:]`; the text the window had before
    this token (`ids[prefix_offset:read_offset]`) is left context, so decoders that look at the
    previous token (leading spaces, byte-level pieces) behave as in a full decode. Text is held
    back while it ends in U+FFFD, i.e. a UTF-8 character split over tokens is still incomplete.
    `flush` returns what is still held back at the end. The deltas concatenate to
    `tokenizer.decode(token_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self.token_ids.append(token_id)
        new_text = self._decode_window()
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """Return the held-back tail (an incomplete character decodes to U+FFFD, as in `decode`)."""
        new_text = self._decode_window()
        if len(new_text) <= len(self._prefix_text):
            return ""
        return self._advance(new_text)

    def _decode_window(self) -> str:
        return self.tokenizer.decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)

    def _advance(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._prefix_text = self.tokenizer.decode(
            self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens
        )
        return delta


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' override: no HTML escaping, json.dumps options exposed."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _special_id(tok: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    """The id of a tokenizer_config special token (a string or a serialized AddedToken)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    token_id = tok.token_to_id(token)
    if token_id is None:
        logger.warning("special token %r from tokenizer_config.json is not in the vocabulary", token)
    return token_id


def _pick_chat_template(value: str | list | None) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (use "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _SPLIT_PATTERNS:
        split = pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(SUPPORTED_GGUF_PRES)})")


def _added(tokens: list[str], token_types: list[int], kind: int, special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == kind
    ]


def _post_processor(tokens: list[str], bos_id: int | None) -> processors.PostProcessor:
    if bos_id is None:
        return processors.ByteLevel(trim_offsets=False)
    bos = tokens[int(bos_id)]
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
    )
