"""Linear layers packed at load time (CPU, bfloat16): oneDNN's blocked layout computes exactly what
torch's plain `linear` computes; the compiled kernels' panels (AVX512-BF16) compute the fp32 sum
of the bf16 products, rounded once, for every batch size and shape; a whole model's logits stay
as accurate as torch's bf16 path. (float32's panels: test_f32_panels.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.kernels import cpu_kernels
from worker.loader import load_checkpoint
from worker.model import PackedLinear, Transformer, can_pack_linears, linear_layout

pytestmark = pytest.mark.skipif(not can_pack_linears(torch.device("cpu"), torch.bfloat16),
                                reason="oneDNN bfloat16 is not available on this CPU")


def _panels_available() -> bool:
    kernels = cpu_kernels()
    return kernels is not None and kernels.bf16_gemm_available()


needs_panels = pytest.mark.skipif(not _panels_available(), reason="the kernels are not built with AVX512-BF16 here")


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_layout_is_bitwise_the_plain_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear, PackedLinear.ONEDNN)
    for batch in (1, 5, 16, 77, 300):
        x = torch.randn(batch, 96, dtype=torch.bfloat16)
        assert torch.equal(packed(x), linear(x)), batch


@needs_panels
@pytest.mark.parametrize("in_features,out_features,bias", [(96, 200, False), (96, 200, True), (95, 64, True),
                                                           (576, 960, False), (7, 3, False)])
def test_panels_compute_the_fp32_sum_of_bf16_products(in_features, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear, PackedLinear.PANELS)
    w = linear.weight.float()
    for batch in (1, 2, 5, 12, 13, 16, 77, 300):
        x = torch.randn(batch, in_features, dtype=torch.bfloat16)
        ref = x.float() @ w.T + (linear.bias.float() if bias else 0)
        got = packed.forward_float(x)
        assert got.dtype == torch.float32 and got.shape == (batch, out_features)
        # only the order of the fp32 additions differs
        tol = 1e-5 * (x.float().abs() @ w.abs().T).max().item() + 1e-6
        assert (got - ref).abs().max().item() <= tol, batch
        rounded = packed(x)
        assert rounded.dtype == torch.bfloat16
        assert torch.allclose(rounded.float(), got.to(torch.bfloat16).float(), rtol=2 ** -7, atol=tol)


@needs_panels
def test_panels_take_strided_and_batched_inputs():
    torch.manual_seed(1)
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    packed = PackedLinear(linear, PackedLinear.PANELS)
    wide = torch.randn(9, 100, dtype=torch.bfloat16)
    x = wide[:, 10:74]  # rows 100 apart
    assert torch.equal(packed(x), packed(x.contiguous()))
    x3 = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(packed(x3), packed(x3.reshape(10, 64)).reshape(2, 5, 96))
    assert packed(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 96)


@needs_panels
def test_panels_refuse_mismatched_inputs():
    packed = PackedLinear(nn.Linear(64, 96).to(torch.bfloat16), PackedLinear.PANELS)
    with pytest.raises(RuntimeError, match="in_features"):
        packed(torch.randn(3, 62, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16"):
        packed(torch.randn(3, 64))


def _logit_error(model: Transformer, ids: torch.Tensor, ref: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model.forward_reference(ids) - ref).abs().max().item()


def test_a_bf16_model_is_packed_and_its_logits_stay_as_accurate(tiny_hf_model, monkeypatch):
    ckpt = load_checkpoint(str(tiny_hf_model))
    ids = torch.tensor([(i * 37) % 200 + 3 for i in range(40)])
    monkeypatch.setenv("KVWEAVE_PACKED_LINEAR", "0")
    fp32 = Transformer(ckpt.args, torch.float32)  # the reference: torch's fp32 linear
    fp32.load_weights(ckpt.weights)
    with torch.inference_mode():
        ref = fp32.forward_reference(ids)
    monkeypatch.delenv("KVWEAVE_PACKED_LINEAR")

    packed = Transformer(ckpt.args, torch.bfloat16)
    packed.load_weights(ckpt.weights)
    assert all(type(m) is not nn.Linear for m in packed.modules())
    assert sum(type(m) is PackedLinear for m in packed.modules()) == 4 * ckpt.args.n_layers + 1
    assert packed.linear_layout == linear_layout(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("KVWEAVE_PACKED_LINEAR", "0")
    plain = Transformer(ckpt.args, torch.bfloat16)
    plain.load_weights(ckpt.weights)
    assert not any(type(m) is PackedLinear for m in plain.modules()) and plain.linear_layout == 0
    monkeypatch.setenv("KVWEAVE_PACKED_LINEAR", "onednn")
    onednn = Transformer(ckpt.args, torch.bfloat16)
    onednn.load_weights(ckpt.weights)
    assert onednn.linear_layout == PackedLinear.ONEDNN
    with torch.inference_mode():
        assert torch.equal(onednn.forward_reference(ids), plain.forward_reference(ids))
    plain_error = _logit_error(plain, ids, ref)
    assert _logit_error(packed, ids, ref) <= 1.5 * plain_error + 1e-3
