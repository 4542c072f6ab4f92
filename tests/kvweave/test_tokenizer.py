"""Tokenizer: tokenizer.json vs GGUF rebuild, chat templates, incremental detokenization."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvweave.gguf_file import GGUFFile
from kvweave.tokenizer import (
    SUPPORTED_GGUF_PRES,
    IncrementalDetokenizer,
    InvalidMessagesError,
    Tokenizer,
    TokenizerError,
)

SAMPLES = [
    "Hello world! It's a test.",
    "12345 and 3.14159",
    "  a\n\n\tb  ",
    "café naïve — Straße",
    "中文测试，你好世界",
    "emoji 🙂🚀👍🏽 done",
    "mixed: 42 €5 π≈3.14 <|im_start|> in text",
    "",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf_model: Path) -> Tokenizer:
    import json

    config = json.loads((tiny_hf_model / "tokenizer_config.json").read_text())
    return Tokenizer.from_file(tiny_hf_model / "tokenizer.json", config)


@pytest.fixture(scope="module")
def gguf_tokenizer(tiny_gguf_model: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(tiny_gguf_model).fields)


@pytest.fixture(params=["hf", "gguf"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_special_ids_from_config(hf_tokenizer: Tokenizer) -> None:
    assert hf_tokenizer.bos_token_id == hf_tokenizer.token_to_id("<|im_start|>") == 1
    assert hf_tokenizer.eos_token_ids == [hf_tokenizer.token_to_id("<|im_end|>")] == [2]
    assert hf_tokenizer.vocab_size == hf_tokenizer.hf_tokenizer.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_rebuild_encodes_like_tokenizer_json(
    hf_tokenizer: Tokenizer, gguf_tokenizer: Tokenizer, text: str
) -> None:
    assert gguf_tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_gguf_rebuild_keeps_specials_and_template(hf_tokenizer: Tokenizer, gguf_tokenizer: Tokenizer) -> None:
    assert gguf_tokenizer.vocab_size == hf_tokenizer.vocab_size
    assert gguf_tokenizer.bos_token_id == hf_tokenizer.bos_token_id
    assert gguf_tokenizer.eos_token_ids == hf_tokenizer.eos_token_ids
    assert gguf_tokenizer.chat_template == hf_tokenizer.chat_template
    assert gguf_tokenizer.encode_chat(CHAT) == hf_tokenizer.encode_chat(CHAT)


def test_gguf_add_bos_token_flag(tiny_gguf_model: Path) -> None:
    fields = GGUFFile(tiny_gguf_model).fields | {"tokenizer.ggml.add_bos_token": True}
    tok = Tokenizer.from_gguf(fields)
    assert tok.encode("hi", add_special_tokens=True) == [1, *tok.encode("hi")]


@pytest.mark.parametrize("pre", SUPPORTED_GGUF_PRES)
def test_gguf_pre_tokenizers_build_and_round_trip(tiny_gguf_model: Path, pre: str) -> None:
    tok = Tokenizer.from_gguf(GGUFFile(tiny_gguf_model).fields | {"tokenizer.ggml.pre": pre})
    text = "It's 2024: café 中文 🙂\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_gguf_unsupported_pre_tokenizer(tiny_gguf_model: Path) -> None:
    fields = GGUFFile(tiny_gguf_model).fields | {"tokenizer.ggml.pre": "no-such-pre"}
    with pytest.raises(TokenizerError, match="unsupported GGUF pre-tokenizer 'no-such-pre'.*smollm"):
        Tokenizer.from_gguf(fields)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_split_individually(tokenizer: Tokenizer) -> None:
    assert [tokenizer.decode([i]) for i in tokenizer.encode("12345")] == list("12345")


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user<|im_end|>"


def test_chat_template_renders_chatml(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(CHAT)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tokenizer.apply_chat_template(CHAT, add_generation_prompt=False).endswith("assistant\n")


def test_encode_chat_uses_single_special_ids(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    ids = tokenizer.encode_chat(messages)
    newline = tokenizer.encode("\n")
    assert ids[0] == 1
    assert ids.count(1) == 2 and ids.count(2) == 1
    assert ids[-len(tokenizer.encode("assistant\n")) - 1:] == [1, *tokenizer.encode("assistant\n")]
    assert ids[ids.index(2) + 1: ids.index(2) + 1 + len(newline)] == newline
    assert tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.apply_chat_template(messages)


def test_missing_chat_template_is_a_clear_error(hf_tokenizer: Tokenizer) -> None:
    bare = Tokenizer(hf_tokenizer.hf_tokenizer)
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\]\['role'\] must be one of system, developer, user, assistant, tool"),
        ([{"role": "root", "content": "x"}], r"\['role'\] must be one of .*; got 'root'"),
        ([{"role": "r" * 10_000, "content": "x"}], r"got 'r{32}'$"),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": 3}],
            r"messages\[1\]\['content'\] must be a string, got int",
        ),
        ([{"role": "user"}], "got nothing"),
    ],
)
def test_malformed_messages(hf_tokenizer: Tokenizer, messages, problem: str) -> None:
    with pytest.raises(InvalidMessagesError, match=problem):
        hf_tokenizer.apply_chat_template(messages)
    assert issubclass(InvalidMessagesError, ValueError)


def test_template_raise_exception_becomes_invalid_messages(hf_tokenizer: Tokenizer) -> None:
    strict = Tokenizer(
        hf_tokenizer.hf_tokenizer,
        chat_template=(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
        ),
    )
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidMessagesError, match="first message must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_template_sees_bos_and_eos_tokens(hf_tokenizer: Tokenizer) -> None:
    template = "{{ bos_token }}|{{ eos_token }}"
    tok = Tokenizer(hf_tokenizer.hf_tokenizer, bos_token_id=1, eos_token_ids=[2], chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>|<|im_end|>"


def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_deltas_concatenate_to_decode(tokenizer: Tokenizer, skip: bool) -> None:
    ids = tokenizer.encode_chat(CHAT) + tokenizer.encode("Sure! 🙂 中文 café 12 + 30 = 42.\n\tdone") + [2]
    deltas = _stream(tokenizer, ids, skip)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""


def test_incremental_holds_back_split_characters(hf_tokenizer: Tokenizer) -> None:
    byte_ids = [_byte_token_id(hf_tokenizer, b) for b in "a🙂中".encode()]
    deltas = _stream(hf_tokenizer, byte_ids)
    assert deltas == ["a", "", "", "", "🙂", "", "", "中", ""]


def test_incremental_flush_returns_incomplete_tail(hf_tokenizer: Tokenizer) -> None:
    ids = [_byte_token_id(hf_tokenizer, b) for b in "x🙂".encode()[:3]]
    deltas = _stream(hf_tokenizer, ids)
    assert deltas[:-1] == ["x", "", ""]
    assert "".join(deltas) == hf_tokenizer.decode(ids) == "x\ufffd"


def test_incremental_window_stays_bounded(hf_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(hf_tokenizer)
    for token_id in hf_tokenizer.encode("word " * 200):
        detok.add(token_id)
        assert len(detok.token_ids) - detok.prefix_offset <= 2


def _byte_token_id(tokenizer: Tokenizer, byte: int) -> int:
    """Id of the byte-level token for one raw byte (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + others.index(byte))
    token_id = tokenizer.token_to_id(char)
    assert token_id is not None
    return token_id


# ------------------------------------------------------------ the real default model (SmolLM2)

@pytest.mark.slow
@pytest.mark.parametrize("text", ["café", "中文", "🙂", "  a\n\n\tb  ", "Hello, world! 12345"])
def test_default_round_trip(default_checkpoint, text: str) -> None:
    tok = default_checkpoint.tokenizer
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_default_digits_and_specials(default_checkpoint) -> None:
    tok = default_checkpoint.tokenizer
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, [2], 49152)


@pytest.mark.slow
def test_default_chat_template(default_checkpoint) -> None:
    tok = default_checkpoint.tokenizer
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == 1 and ids[-1 - len(tok.encode("assistant\n"))] == 1 and ids.count(2) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_default_incremental_detokenizer(default_checkpoint) -> None:
    tok = default_checkpoint.tokenizer
    ids = tok.encode("Voilà 🙂🚀 中文字符 — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok") + [2]
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
