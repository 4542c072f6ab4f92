"""float32 linear layers packed at load time into the compiled kernels' fp32 panels (AVX2 + FMA):
they compute the fp32 sum of the products up to the order of the additions, each row the same
whatever the batch around it, and a float32 model is packed where its layers fill whole panels."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.kernels import cpu_kernels
from worker.loader import load_checkpoint
from worker.model import PackedLinear, Transformer, linear_layout


def _available() -> bool:
    kernels = cpu_kernels()
    return kernels is not None and kernels.f32_gemm_available()


pytestmark = pytest.mark.skipif(not _available(), reason="the kernels are not built with AVX2 and FMA here")


@pytest.mark.parametrize("in_features,out_features,bias", [(96, 200, False), (96, 200, True), (95, 64, True),
                                                           (576, 960, False), (7, 3, False)])
def test_panels_compute_the_fp32_sum(in_features, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(linear, PackedLinear.F32_PANELS)
    w = linear.weight.detach().double()
    for batch in (1, 2, 5, 6, 7, 13, 77, 300):
        x = torch.randn(batch, in_features)
        ref = x.double() @ w.T + (linear.bias.detach().double() if bias else 0)
        got = packed(x)
        assert got.dtype == torch.float32 and got.shape == (batch, out_features)
        tol = 1e-6 * (x.double().abs() @ w.abs().T).max().item() + 1e-7  # fp32 rounding of in_features terms
        assert (got.double() - ref).abs().max().item() <= tol, batch
        assert torch.equal(packed.forward_float(x), got)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_packed_layout_is_panels_of_16_rows_zero_padded(transposed):
    w = torch.randn(70, 37).T if transposed else torch.randn(37, 70)  # [37, 70], strided or not
    want = torch.zeros(48, 70)
    want[:37] = w
    assert torch.equal(cpu_kernels().pack_f32_weight(w), want.view(3, 16, 70).permute(0, 2, 1))


def test_a_row_gets_the_same_bits_in_any_batch():
    torch.manual_seed(1)
    packed = PackedLinear(nn.Linear(64, 48), PackedLinear.F32_PANELS)
    x = torch.randn(13, 64)
    whole = packed(x)
    for i in range(13):
        assert torch.equal(packed(x[i:i + 1]), whole[i:i + 1]), i
    assert torch.equal(packed(x[3:10]), whole[3:10])


def test_panels_take_strided_and_batched_inputs_and_refuse_mismatched_ones():
    torch.manual_seed(2)
    packed = PackedLinear(nn.Linear(64, 96), PackedLinear.F32_PANELS)
    wide = torch.randn(9, 100)
    x = wide[:, 10:74]  # rows 100 apart
    assert torch.equal(packed(x), packed(x.contiguous()))
    assert torch.equal(packed(wide.T[10:74].T), packed(x))  # columns not contiguous: copied first
    x3 = torch.randn(2, 5, 64)
    assert torch.equal(packed(x3), packed(x3.reshape(10, 64)).reshape(2, 5, 96))
    assert packed(torch.empty(0, 64)).shape == (0, 96)
    with pytest.raises(RuntimeError, match="in_features"):
        packed(torch.randn(3, 62))
    with pytest.raises(RuntimeError, match="float32"):
        packed(torch.randn(3, 64, dtype=torch.bfloat16))


def test_a_float32_model_is_packed_and_computes_what_the_plain_one_does(tiny_hf_model, monkeypatch):
    ckpt = load_checkpoint(str(tiny_hf_model))
    ids = torch.tensor([(i * 37) % 200 + 3 for i in range(40)])
    assert linear_layout(torch.device("cpu"), torch.float32) == PackedLinear.F32_PANELS
    packed = Transformer(ckpt.args, torch.float32)
    packed.load_weights(ckpt.weights)
    assert ckpt.args.dim < PackedLinear.F32_MIN_DIM and packed.linear_layout == 0  # too narrow to pay
    packed.pack_linears(PackedLinear.F32_PANELS)
    assert packed.linear_layout == PackedLinear.F32_PANELS
    assert all(type(m) is not nn.Linear for m in packed.modules())
    assert sum(type(m) is PackedLinear for m in packed.modules()) == 4 * ckpt.args.n_layers + 1
    monkeypatch.setenv("KVWEAVE_PACKED_LINEAR", "0")
    plain = Transformer(ckpt.args, torch.float32)
    plain.load_weights(ckpt.weights)
    assert plain.linear_layout == 0 and not any(type(m) is PackedLinear for m in plain.modules())
    with torch.inference_mode():
        torch.testing.assert_close(packed.forward_reference(ids), plain.forward_reference(ids), atol=1e-4, rtol=1e-4)


def test_a_model_whose_layers_do_not_fill_whole_panels_keeps_plain_weights(tiny_hf_model):
    ckpt = load_checkpoint(str(tiny_hf_model))
    odd = Transformer(ckpt.args, torch.float32)
    odd.layers[0].mlp.down_proj = nn.Linear(odd.layers[0].mlp.down_proj.in_features, 8, bias=False)
    odd.pack_linears(PackedLinear.F32_PANELS)
    assert odd.linear_layout == 0 and not any(type(m) is PackedLinear for m in odd.modules())
