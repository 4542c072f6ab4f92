"""The default model exported as a Hugging Face folder (benchmarks/hf_export.py), loaded by
`transformers` itself: the same fp32 logits as kvweave's reference forward over the same bf16
weights, and a tokenizer that encodes, decodes and renders chats as kvweave's does."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.hf_export import STAMP, export_hf_folder

pytestmark = pytest.mark.slow

LOGITS_TOLERANCE = 2e-3
"""Largest |difference| of fp32 logits (magnitudes ~10-30): the two forwards sum in other orders."""
TEXTS = ["Hello there, 12 apples 🙂 and naïve café", "def f(x):\n    return x  # tabs\tand  spaces",
         "<|im_start|>user\nHi<|im_end|>"]


@pytest.fixture(scope="module")
def exported(default_model_path, tmp_path_factory):
    return export_hf_folder("smollm2-135m", tmp_path_factory.mktemp("hf") / "smollm2-135m")


@pytest.fixture(scope="module")
def kvweave_bf16():
    from worker.loader import load_checkpoint

    return load_checkpoint("smollm2-135m", dtype=torch.bfloat16)


@torch.inference_mode()
def test_transformers_gives_kvweaves_logits(exported, kvweave_bf16):
    from transformers import AutoModelForCausalLM

    from worker.model import Transformer

    ids = kvweave_bf16.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ours = Transformer(kvweave_bf16.args, torch.float32)  # the bf16-rounded weights the folder holds, in fp32
    ours.load_weights({k: v.float() for k, v in kvweave_bf16.weights.items()})
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    ours_logits = ours.forward_reference(torch.tensor(ids))
    theirs_logits = theirs(torch.tensor([ids])).logits[0]
    assert theirs_logits.shape == ours_logits.shape == (len(ids), 49152)
    assert (ours_logits - theirs_logits).abs().max().item() < LOGITS_TOLERANCE
    assert torch.equal(ours_logits.argmax(-1), theirs_logits.argmax(-1))


def test_transformers_tokenizer_matches_kvweaves(exported, kvweave_bf16):
    from transformers import AutoTokenizer

    ours, theirs = kvweave_bf16.tokenizer, AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.encode(text) == ours.encode(text, add_special_tokens=True)
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_token_id, ours.eos_token_ids[0])


def test_export_is_reused_and_redone_when_stale(exported):
    stamp = json.loads((exported / STAMP).read_text())
    assert stamp["dtype"] == "bfloat16" and stamp["size"] > 0
    weights = exported / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert export_hf_folder("smollm2-135m", exported) == exported
    assert weights.stat().st_mtime_ns == before  # same source and dtype: nothing rewritten
    (exported / STAMP).write_text(json.dumps(stamp | {"size": 1}))
    export_hf_folder("smollm2-135m", exported)
    assert json.loads((exported / STAMP).read_text()) == stamp  # a stale stamp: written again
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]  # no temporary folder left
