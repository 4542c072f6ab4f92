"""Segment tokenization (kvweave/segments.py) on the tiny trained tokenizer: spans index exactly the
chunk's tokens (decoded back to the chunk's text), special tokens only where the tokenizer's normal
encode puts them, the separator split, chat documents, and every invalid input's message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import normalizers, processors

from kvweave.errors import InvalidRequestError
from kvweave.segments import encode_chat_documents, encode_segments, flatten_messages, split_on_separator
from kvweave.tokenizer import Tokenizer

DOC_A = "Retrieved documents, system prompts and tool outputs recur across requests."
DOC_B = "The quick brown fox jumps over the lazy dog."
QUESTION = " Question: which animal jumps?"


@pytest.fixture(scope="module")
def tok(tiny_hf_model: Path) -> Tokenizer:
    config = json.loads((tiny_hf_model / "tokenizer_config.json").read_text())
    return Tokenizer.from_file(tiny_hf_model / "tokenizer.json", config)


@pytest.fixture(scope="module")
def bos_tok(tok: Tokenizer) -> Tokenizer:
    """The tiny tokenizer with a Llama-style post-processor: BOS before the text."""
    hf = tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
    bos = "<|im_start|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                      special_tokens=[(bos, hf.token_to_id(bos))])
    return Tokenizer(hf, bos_token_id=hf.token_to_id(bos), eos_token_ids=tok.eos_token_ids,
                     chat_template=tok.chat_template)


def chunk_texts(tokenizer: Tokenizer, token_ids: list[int], spans) -> list[str]:
    return [tokenizer.decode(token_ids[a:a + n], skip_special_tokens=False) for a, n in spans]


# -------------------------------------------------------------------------------- encode_segments

@pytest.mark.parametrize("name", ["tok", "bos_tok"])
def test_spans_index_exactly_the_chunks_tokens(request, name):
    tokenizer = request.getfixturevalue(name)
    segments = [("Context: ", False), (DOC_A, True), ("\n", False), (DOC_B, True), (QUESTION, False)]
    token_ids, spans = encode_segments(tokenizer, segments)
    assert chunk_texts(tokenizer, token_ids, spans) == [DOC_A, DOC_B]
    assert [n for _, n in spans] == [len(tokenizer.encode(DOC_A)), len(tokenizer.encode(DOC_B))]
    # each segment tokenized on its own, concatenated after the tokenizer's leading specials
    lead = tokenizer.encode("x", add_special_tokens=True)[:-1]
    assert token_ids == lead + [t for text, _ in segments for t in tokenizer.encode(text)]
    assert tokenizer.decode(token_ids) == "".join(text for text, _ in segments)


def test_bos_only_before_the_first_segment(bos_tok):
    bos = bos_tok.bos_token_id
    token_ids, spans = encode_segments(bos_tok, [(DOC_A, True), (DOC_B, True), (QUESTION, False)])
    assert token_ids[0] == bos and token_ids.count(bos) == 1
    assert spans[0][0] == 1  # the chunk's span excludes the BOS
    assert chunk_texts(bos_tok, token_ids, spans) == [DOC_A, DOC_B]
    # one plain segment is exactly the normal encode; without special tokens there is no BOS
    assert encode_segments(bos_tok, [(QUESTION, False)]) == (bos_tok.encode(QUESTION, add_special_tokens=True), [])
    assert encode_segments(bos_tok, [(DOC_A, True)], add_special_tokens=False)[0] == bos_tok.encode(DOC_A)


@pytest.mark.parametrize("segments, message", [
    ([], "non-empty list"),
    ("just a string", "non-empty list"),
    ([("ok", False), ("", True)], "segment 1 has an empty text"),
    ([("ok", 1)], "segment 0: 'reusable' must be a boolean, got int"),
    ([("ok", "true")], "segment 0: 'reusable' must be a boolean, got str"),
    ([("ok", False), (None, True)], "segment 1: text must be a string"),
    ([("ok",)], "segment 0 must be a (text, reusable) pair"),
])
def test_invalid_segments(tok, segments, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_segments(tok, segments)


def test_a_reusable_segment_that_tokenizes_to_nothing(tok):
    hf = tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
    hf.normalizer = normalizers.Strip()  # whitespace-only text normalizes to nothing
    stripping = Tokenizer(hf)
    assert stripping.encode("   ") == []
    with pytest.raises(InvalidRequestError, match="reusable segment 1 tokenizes to no tokens"):
        encode_segments(stripping, [("Hello", False), ("   ", True)])


# -------------------------------------------------------------------------------- separator

@pytest.mark.parametrize("text, expected", [
    ("no separator here", [("no separator here", False)]),
    ("Intro|DOC|A|DOC|B|DOC|Question", [("Intro", False), ("A", True), ("B", True), ("Question", False)]),
    ("|DOC|A|DOC|Q", [("A", True), ("Q", False)]),
    ("|DOC|A|DOC|", [("A", True)]),
    ("head|DOC|tail", [("head", False), ("tail", False)]),
])
def test_split_on_separator(text, expected):
    assert split_on_separator(text, "|DOC|") == expected


def test_split_on_separator_rejects_empty_chunks():
    with pytest.raises(InvalidRequestError, match="chunk 1 of the prompt .* is empty"):
        split_on_separator("a<s>b<s><s>c", "<s>")
    with pytest.raises(InvalidRequestError, match="only chunk separators"):
        split_on_separator("<s>", "<s>")


def test_separator_segments_encode_to_their_chunks(tok):
    token_ids, spans = encode_segments(tok, split_on_separator(f"Context:@@{DOC_A}@@{DOC_B}@@{QUESTION}", "@@"))
    assert chunk_texts(tok, token_ids, spans) == [DOC_A, DOC_B]
    assert tok.decode(token_ids) == f"Context:{DOC_A}{DOC_B}{QUESTION}"


# -------------------------------------------------------------------------------- chat documents

def test_chat_without_documents_is_encode_chat(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert encode_chat_documents(tok, messages) == (tok.encode_chat(messages), [])
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    assert encode_chat_documents(tok, parts) == (tok.encode_chat([{"role": "user", "content": "Hi!"}]), [])


def test_chat_documents_become_spans(tok):
    messages = [
        {"role": "system", "content": DOC_A, "kvweave": {"document": True}},
        {"role": "user", "content": [{"type": "text", "text": "Read this: "}, {"type": "document", "text": DOC_B},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "Not a document", "kvweave": {"document": False}},
    ]
    token_ids, spans = encode_chat_documents(tok, messages)
    assert chunk_texts(tok, token_ids, spans) == [DOC_A, DOC_B]
    inlined, docs = flatten_messages(messages)
    assert docs == [DOC_A, DOC_B]
    # the whole prompt is the rendered chat with the documents in place
    assert tok.decode(token_ids, skip_special_tokens=False) == tok.apply_chat_template(inlined)
    assert tok.encode_chat(inlined)[:spans[0][0]] == token_ids[:spans[0][0]]  # the same template prefix


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "x", "kvweave": {"document": "yes"}}],
     "messages[0]['kvweave']['document'] must be a boolean, got str"),
    ([{"role": "user", "content": "x", "kvweave": True}], "messages[0]['kvweave'] must be an object"),
    ([{"role": "user", "content": "x", "kvweave": {"doc": True}}], "unknown option(s) doc"),
    ([{"role": "user", "content": "", "kvweave": {"document": True}}], "messages[0]: the document is empty"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}], "kvweave": {"document": True}}],
     "marked as a document, so its content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0]['content'][0]: unsupported content part type 'image_url'"),
    ([{"role": "user", "content": [{"type": "document"}]}],
     "messages[0]['content'][0]: a 'document' part needs a string"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "a 'text' part needs a string 'text'"),
    ([{"role": "user", "content": [{"type": "document", "text": ""}]}],
     "messages[0]['content'][0]: the document is empty"),
    ([{"role": "user", "content": ["plain"]}], "messages[0]['content'][0] must be an object"),
    ([], "non-empty list"),
    ([{"role": "user", "content": 5}], "content'] must be a string"),
])
def test_invalid_chat_documents(tok, messages, message):
    with pytest.raises(InvalidRequestError) as exc:
        encode_chat_documents(tok, messages)
    assert message in str(exc.value)


def test_a_template_that_drops_a_document_is_an_error(tok):
    last_only = Tokenizer(tok.hf_tokenizer, chat_template="{{ messages[-1]['content'] }}")
    messages = [{"role": "user", "content": DOC_A, "kvweave": {"document": True}}, {"role": "user", "content": "Q"}]
    with pytest.raises(InvalidRequestError, match="dropped, repeated or reordered document 0"):
        encode_chat_documents(last_only, messages)
