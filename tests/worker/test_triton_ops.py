"""The decoder layer's elementwise ops as Triton kernels (worker/triton_ops.py, the GPU path), run
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): each
against torch's ops in float32 (to rounding) and bfloat16 (to about one bf16 step), RoPE on the strided
q/k part of a fused qkv output, and the whole engine on these kernels matching the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvweave.sampling_params import SamplingParams
from worker import ops, triton_ops

from engine_reference import reference_greedy

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n", [(1, 64), (5, 576), (3, 100)])
def test_add_rms_norm_matches_torch(dtype, rows, n):
    x, r, w = _rand(rows, n, dtype=dtype, seed=1), _rand(rows, n, dtype=dtype, seed=2), _rand(n, dtype=dtype, seed=3)
    want_r = (r.float() + x.float()).to(dtype)
    want = F.rms_norm(want_r.float(), (n,), w.float(), 1e-5)
    got, got_r = triton_ops.add_rms_norm(x.clone(), r.clone(), w, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(got_r, want_r)
    else:  # one bf16 step at most (the interpreter's float-to-bf16 conversion truncates; CUDA's rounds)
        assert ((got_r.float() - want_r.float()).abs() <= want_r.float().abs() * 2**-7 + 1e-6).all()
    assert (got.float() - want).abs().max().item() <= TOL[dtype] * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [96, 1536])
def test_silu_and_mul_matches_torch(dtype, d):
    x = _rand(4, 2 * d, dtype=dtype, seed=4)
    want = F.silu(x[:, :d].float()) * x[:, d:].float()
    got = triton_ops.silu_and_mul(x)
    assert got.shape == (4, d) and (got.float() - want).abs().max().item() <= TOL[dtype] * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_the_qk_part_of_a_fused_qkv_in_place(dtype):
    tokens, heads, kv_heads, hd = 6, 9, 3, 64
    qkv = _rand(tokens, (heads + 2 * kv_heads) * hd, dtype=dtype, seed=5)
    qk = qkv[:, :(heads + kv_heads) * hd].view(tokens, heads + kv_heads, hd)  # rows strided by the whole qkv
    angles = torch.arange(tokens)[:, None] * (10000.0 ** (-torch.arange(hd // 2) / (hd // 2)))
    cos, sin = angles.cos(), angles.sin()
    want = qk.clone()
    ops_torch = want.float()
    x1, x2 = ops_torch.chunk(2, dim=-1)
    want = torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], dim=-1)
    v_before = qkv[:, (heads + kv_heads) * hd:].clone()
    triton_ops.rope_(qk, cos, sin)
    assert (qk.float() - want).abs().max().item() <= TOL[dtype] * 4
    assert torch.equal(qkv[:, (heads + kv_heads) * hd:], v_before)  # v untouched


def test_engine_on_the_triton_elementwise_ops_matches_the_reference(monkeypatch, tiny_model_variant,
                                                                      tiny_engine_factory):
    monkeypatch.setattr(ops, "_FORCED", "triton")
    engine = tiny_engine_factory(tiny_model_variant("qwen2-bias"), block_size=4, max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, engine.args.vocab_size, (n,), generator=g).tolist() for n in (3, 19)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    monkeypatch.setattr(ops, "_FORCED", "torch")  # the reference by torch's ops
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(engine, prompt, 4)[0]
