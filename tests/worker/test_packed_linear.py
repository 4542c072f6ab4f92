"""Linear layers packed in oneDNN's blocked layout at load time (CPU, bfloat16) compute exactly what
torch's plain `linear` computes, for every batch size, on a whole model; and float32 is left alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.loader import load_checkpoint
from worker.model import PackedLinear, Transformer, can_pack_linears

pytestmark = pytest.mark.skipif(not can_pack_linears(torch.device("cpu"), torch.bfloat16),
                                reason="oneDNN bfloat16 is not available on this CPU")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_bitwise_the_plain_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for batch in (1, 5, 16, 77, 300):
        x = torch.randn(batch, 96, dtype=torch.bfloat16)
        assert torch.equal(packed(x), linear(x)), batch


def test_a_bf16_model_is_packed_and_its_logits_are_unchanged(tiny_hf_model, monkeypatch):
    ckpt = load_checkpoint(str(tiny_hf_model))
    ids = torch.tensor([(i * 37) % 200 + 3 for i in range(40)])
    packed = Transformer(ckpt.args, torch.bfloat16)
    packed.load_weights(ckpt.weights)
    assert all(type(m) is not nn.Linear for m in packed.modules())
    assert sum(type(m) is PackedLinear for m in packed.modules()) == 4 * ckpt.args.n_layers + 1
    monkeypatch.setenv("KVWEAVE_PACKED_LINEAR", "0")
    plain = Transformer(ckpt.args, torch.bfloat16)
    plain.load_weights(ckpt.weights)
    assert not any(type(m) is PackedLinear for m in plain.modules())
    with torch.inference_mode():
        assert torch.equal(packed.forward_reference(ids), plain.forward_reference(ids))
    fp32 = Transformer(ckpt.args, torch.float32)
    fp32.load_weights(ckpt.weights)
    assert not any(type(m) is PackedLinear for m in fp32.modules())  # fp32 keeps torch's linear
