"""Prompts given as segments: text pieces, some marked reusable (chunks whose KV may be reused wherever
they appear: retrieved documents, tool outputs). One tokenization shared by the router and tests.

- `encode_segments(tokenizer, segments)`: each segment tokenized on its own and concatenated; the
  tokenizer's special tokens (BOS) only where its normal `encode(..., add_special_tokens=True)` puts
  them, i.e. before the first segment; returns the token ids and the (start, length) token span of
  every reusable segment.
- `split_on_separator(text, separator)`: for clients that cannot change the request shape: the pieces
  strictly between two separators are reusable chunks, the first and last piece are not.
- `encode_chat_documents(tokenizer, messages)`: chat messages that mark documents, either a whole
  message (`"kvweave": {"document": true}`) or content parts `{"type": "document", "text": ...}` mixed
  with `{"type": "text", "text": ...}`; the chat template is rendered with a unique sentinel in place
  of each document, the rendered text is split at the sentinels, and the pieces become segments.
Every problem raises `InvalidRequestError` with a message naming the segment, message or part.
The router and the engine both tokenize prompts this way, so it is in the shared bottom layer.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from kvweave.errors import InvalidRequestError
from kvweave.tokenizer import InvalidMessagesError, Tokenizer, TokenizerError

Segments = Sequence[tuple[str, bool]]
Span = tuple[int, int]
CHAT_EXTENSION = "kvweave"
"""The key of a chat message's kvweave options ({"document": bool})."""


def check_segments(segments: Any) -> list[tuple[str, bool]]:
    """`segments` as a list of (text, reusable) pairs; raises InvalidRequestError for an empty list, a
    segment that is not a (str, bool) pair, or an empty text."""
    if not isinstance(segments, (list, tuple)) or not segments:
        raise InvalidRequestError("segments must be a non-empty list of (text, reusable) pairs")
    out = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise InvalidRequestError(f"segment {i} must be a (text, reusable) pair")
        text, reusable = seg
        if not isinstance(text, str):
            raise InvalidRequestError(f"segment {i}: text must be a string, got {type(text).__name__}")
        if not isinstance(reusable, bool):
            raise InvalidRequestError(f"segment {i}: 'reusable' must be a boolean, got {type(reusable).__name__}")
        if not text:
            raise InvalidRequestError(f"segment {i} has an empty text")
        out.append((text, reusable))
    return out


def encode_segments(tokenizer: Tokenizer, segments: Segments, add_special_tokens: bool = True
                    ) -> tuple[list[int], list[Span]]:
    """(token ids, spans): each segment tokenized separately and concatenated; `spans` are the
    (start, length) of each reusable segment's tokens. With `add_special_tokens`, the tokenizer's
    special tokens go where its normal encode puts them around the whole text (BOS at the start)."""
    segments = check_segments(segments)
    pieces = [tokenizer.encode(text, add_special_tokens=False) for text, _ in segments]
    lead: list[int] = []
    trail: list[int] = []
    if add_special_tokens:
        lead, trail = _special_tokens_around(tokenizer, segments[0][0], pieces[0])
    token_ids, spans = list(lead), []
    for i, ((_, reusable), ids) in enumerate(zip(segments, pieces)):
        if reusable:
            if not ids:
                raise InvalidRequestError(f"reusable segment {i} tokenizes to no tokens")
            spans.append((len(token_ids), len(ids)))
        token_ids += ids
    return token_ids + trail, spans


def _special_tokens_around(tokenizer: Tokenizer, text: str, plain: list[int]) -> tuple[list[int], list[int]]:
    """The tokens `encode(text, add_special_tokens=True)` adds before and after `plain` (its ids without)."""
    full = tokenizer.encode(text, add_special_tokens=True)
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start:start + n] == plain:
            return full[:start], full[start + n:]
    return [], []  # a post-processor that rewrites the text's own tokens: add nothing


def split_on_separator(text: str, separator: str) -> list[tuple[str, bool]]:
    """Segments of `text` split at `separator` (removed): the pieces strictly between two separators
    are reusable, the first and last are not (and are left out when empty). A text without the
    separator is one non-reusable segment. Raises InvalidRequestError for an empty chunk."""
    if not separator:
        raise ValueError("the chunk separator must be a non-empty string")
    pieces = text.split(separator)
    if len(pieces) == 1:
        return [(text, False)]
    out = []
    for i, piece in enumerate(pieces):
        edge = i in (0, len(pieces) - 1)
        if not piece:
            if edge:
                continue
            raise InvalidRequestError(f"chunk {i - 1} of the prompt (between separators {i - 1} and {i}) is empty")
        out.append((piece, not edge))
    if not out:
        raise InvalidRequestError("prompt is empty (it holds only chunk separators)")
    return out


# -------------------------------------------------------------------------------- chat documents

def flatten_messages(messages: Any, sentinel: str | None = None) -> tuple[list[dict], list[str]]:
    """Messages with plain string contents for the chat template, and the document texts in order.

    Document text is replaced by `sentinel.format(i)` for the i-th document; with `sentinel=None`
    documents are inlined (their text is kept as is). Raises InvalidRequestError for invalid marks:
    `kvweave` not an object, `document` not a boolean, a document message whose content is not a
    non-empty string, a content part that is not {"type": "text"|"document", "text": str}, an empty
    document."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects")
    out, docs = [], []

    def doc(text: str, where: str) -> str:
        if not text:
            raise InvalidRequestError(f"{where}: the document is empty")
        docs.append(text)
        return text if sentinel is None else sentinel.format(len(docs) - 1)

    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object, got {type(message).__name__}")
        message = dict(message)
        options = message.pop(CHAT_EXTENSION, None)
        is_doc = False
        if options is not None:
            if not isinstance(options, dict):
                raise InvalidRequestError(f"messages[{i}]['{CHAT_EXTENSION}'] must be an object, got "
                                          f"{type(options).__name__}")
            unknown = sorted(set(options) - {"document"})
            if unknown:
                raise InvalidRequestError(f"messages[{i}]['{CHAT_EXTENSION}']: unknown option(s) {', '.join(unknown)}")
            is_doc = options.get("document", False)
            if not isinstance(is_doc, bool):
                raise InvalidRequestError(f"messages[{i}]['{CHAT_EXTENSION}']['document'] must be a boolean, got "
                                          f"{type(is_doc).__name__}")
        content = message.get("content")
        if is_doc:
            if not isinstance(content, str):
                raise InvalidRequestError(f"messages[{i}] is marked as a document, so its content must be a "
                                          f"string, got {type(content).__name__}")
            message["content"] = doc(content, f"messages[{i}]")
        elif isinstance(content, list):
            message["content"] = "".join(_part_text(part, i, j, doc) for j, part in enumerate(content))
        out.append(message)
    return out, docs


def _part_text(part: Any, i: int, j: int, doc) -> str:
    where = f"messages[{i}]['content'][{j}]"
    if not isinstance(part, dict):
        raise InvalidRequestError(f"{where} must be an object, got {type(part).__name__}")
    kind, text = part.get("type"), part.get("text")
    if kind not in ("text", "document"):
        raise InvalidRequestError(f"{where}: unsupported content part type {kind!r} (supported: 'text', 'document')")
    if not isinstance(text, str):
        raise InvalidRequestError(f"{where}: a {kind!r} part needs a string 'text'")
    return doc(text, where) if kind == "document" else text


def encode_chat_documents(tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True
                          ) -> tuple[list[int], list[Span]]:
    """(token ids, spans) of a chat whose messages may mark documents (see the module doc). Without
    documents this is exactly `tokenizer.encode_chat` and no spans. Message content and documents
    are data: special-token text in them is tokenized as text (`Tokenizer.encode_chat_pieces`)."""
    nonce = secrets.token_hex(8)
    sentinel = f"KVWEAVEDOC{nonce}N{{}}E"
    flat, docs = flatten_messages(messages, sentinel)
    try:
        pieces = tokenizer.render_chat_pieces(flat, add_generation_prompt)
    except (InvalidMessagesError, TokenizerError) as e:
        raise InvalidRequestError(str(e), getattr(e, "param", None)) from e
    if not docs:
        return tokenizer.encode_chat_pieces(pieces), []
    runs = split_at_sentinels(pieces, sentinel, len(docs))
    token_ids: list[int] = []
    spans: list[Span] = []
    for k, run in enumerate(runs):
        token_ids += tokenizer.encode_chat_pieces(run)
        if k < len(docs):
            ids = tokenizer.encode(docs[k], special_as_text=True)
            if not ids:
                raise InvalidRequestError(f"chat documents: reusable segment {k} tokenizes to no tokens")
            spans.append((len(token_ids), len(ids)))
            token_ids += ids
    return token_ids, spans


def split_at_sentinels(pieces: list[tuple[str, bool]], sentinel: str, num_docs: int, what: str = "document"
                       ) -> list[list[tuple[str, bool]]]:
    """The rendered chat's pieces split at the sentinels of its documents (or images: `what`):
    num_docs + 1 runs of pieces."""
    rendered = "".join(text for text, _ in pieces)
    runs: list[list[tuple[str, bool]]] = [[]]
    k = 0
    for text, is_content in pieces:
        while k < num_docs and sentinel.format(k) in text:
            mark = sentinel.format(k)
            if rendered.count(mark) != 1:
                break
            before, text = text.split(mark, 1)
            runs[-1].append((before, is_content))
            runs.append([])
            k += 1
        runs[-1].append((text, is_content))
    if k != num_docs:
        raise InvalidRequestError(f"the chat template dropped, repeated or reordered {what} {k}; send it as an "
                                  "ordinary message instead")
    return [[p for p in run if p[0]] for run in runs]
