"""The compiled CPU kernels compute what their torch fallbacks compute.

Tolerances: float32 results differ only by summation order (1e-5); bfloat16 results by one
rounding of the stored value (bf16 keeps 8 bits of mantissa, so ~1e-2 relative).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker import ops
from worker.attention import AttentionMetadata, PagedAttention, kv_cache_shape
from worker.kernels import cpu_kernels, kernel_build_dir

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="CPU kernels could not be built here")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def no_kernels(monkeypatch):
    def disable():
        monkeypatch.setattr(ops, "_kernels_for", lambda x: None)
        monkeypatch.setenv("KVWEAVE_ATTENTION_BACKEND", "torch")
    return disable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_torch(dtype, no_kernels):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 20, dtype=torch.float32, generator=g).to(dtype)
    cos, sin = torch.rand(7, 4, generator=g), torch.rand(7, 4, generator=g)
    a = base.clone()
    ops.rope_(a[:, :16].view(7, 2, 8), cos, sin)  # a strided view, as in the fused qkv output
    no_kernels()
    b = base.clone()
    ops.rope_(b[:, :16].view(7, 2, 8), cos, sin)
    torch.testing.assert_close(a, b, **TOL[dtype])
    assert torch.equal(a[:, 16:], base[:, 16:])  # the columns after the view are untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_and_add_rms_norm_match_torch(dtype, no_kernels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=g).to(dtype)
    res = torch.randn(5, 6, generator=g).to(dtype)
    h = torch.randn(5, 6, generator=g).to(dtype)
    w = torch.rand(6, generator=g).to(dtype)
    k_silu = ops.silu_and_mul(x)
    k_norm, k_res = ops.add_rms_norm(h.clone(), res.clone(), w, 1e-5)
    no_kernels()
    torch.testing.assert_close(k_silu, ops.silu_and_mul(x), **TOL[dtype])
    t_norm, t_res = ops.add_rms_norm(h.clone(), res.clone(), w, 1e-5)
    torch.testing.assert_close(k_res, t_res, atol=0, rtol=0)
    torch.testing.assert_close(k_norm, t_norm, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,hd", [(1, 8), (3, 8), (3, 64), (5, 64), (8, 128)])
def test_decode_attention_matches_torch(dtype, group, hd, no_kernels):
    """head_dim 64 and 128 take the vectorized path where the CPU has AVX-512 or AVX2 (query rows in
    chunks of at most 4: groups of 5 and 8 take two), others the portable one."""
    g = torch.Generator().manual_seed(2)
    n_kv, bs, num_blocks = 2, 4, 32
    cache = torch.randn(kv_cache_shape(1, num_blocks, bs, n_kv, hd), generator=g).to(dtype)
    ctx_lens = torch.tensor([1, 5, 13, 9])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:4] for _ in range(4)])
    q = torch.randn(4, n_kv * group, hd, generator=g).to(dtype)
    k_new = cache[0, 0, :, tables[:, 0] * bs].transpose(0, 1).contiguous()  # rewrite existing slots
    v_new = cache[1, 0, :, tables[:, 0] * bs].transpose(0, 1).contiguous()
    meta = AttentionMetadata(slot_mapping=tables[:, 0] * bs, num_decodes=4,
                             decode_block_tables=tables, decode_context_lens=ctx_lens)
    max_len = int(ctx_lens.max())
    slots = (tables[:, :, None] * bs + torch.arange(bs)).view(4, -1)[:, :max_len]
    pad = torch.arange(max_len)[None] >= ctx_lens[:, None]
    meta.decode_slots = slots.contiguous()
    meta.decode_bias = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, float("-inf"))[None, :, None, :]
    out_kernel = PagedAttention(cache, meta, n_kv * group, bs).attend(0, q, k_new, v_new)
    no_kernels()
    out_torch = PagedAttention(cache, meta, n_kv * group, bs).attend(0, q, k_new, v_new)
    torch.testing.assert_close(out_kernel, out_torch, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 128])
def test_decode_attention_vectorized_path_matches_portable(dtype, hd):
    g = torch.Generator().manual_seed(3)
    n_kv, group, bs, num_blocks = 3, 3, 16, 64
    cache = torch.randn(2, n_kv, num_blocks * bs, hd, generator=g).to(dtype)
    ctx_lens = torch.tensor([1, 16, 17, 200, 95])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:13] for _ in range(5)])
    q = torch.randn(5, n_kv * group, hd, generator=g).to(dtype)
    k = cpu_kernels()
    args = (q, cache[0], cache[1], tables, ctx_lens, bs, hd ** -0.5)
    torch.testing.assert_close(k.decode_attention(*args), k.decode_attention(*args, portable=True),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_and_strided_queries_match_torch(dtype):
    """K/V and queries as the model hands them over: strided views of one fused qkv output."""
    g = torch.Generator().manual_seed(4)
    n_q, n_kv, hd, bs, num_blocks, t = 6, 2, 64, 16, 8, 5
    qkv = torch.randn(t, (n_q + 2 * n_kv) * hd, generator=g).to(dtype)
    q = qkv[:, :n_q * hd].view(t, n_q, hd)
    k = qkv[:, n_q * hd:(n_q + n_kv) * hd].view(t, n_kv, hd)
    v = qkv[:, (n_q + n_kv) * hd:].view(t, n_kv, hd)
    cache = torch.randn(2, n_kv, num_blocks * bs, hd, generator=g).to(dtype)
    slots = torch.tensor([3, 17, 40, 41, 127])
    expected = cache.clone()
    expected[0].index_copy_(1, slots, k.transpose(0, 1))
    expected[1].index_copy_(1, slots, v.transpose(0, 1))
    kern = cpu_kernels()
    kern.write_kv(k, v, cache[0], cache[1], slots)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kern.write_kv(k, v, cache[0], cache[1], torch.tensor([0, 1, 2, 3, num_blocks * bs]))
    tables = torch.arange(num_blocks).repeat(t, 1)
    lens = slots + 1
    args = (cache[0], cache[1], tables, lens, bs, hd ** -0.5)
    assert torch.equal(kern.decode_attention(q, *args), kern.decode_attention(q.contiguous(), *args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prefill_after_context_split_path_matches_masked(dtype):
    """A long chunk after cached context runs as two unmasked flash calls merged by log-sum-exp:
    it must equal the masked attention over the whole context."""
    from worker import attention
    from worker.attention import PrefillSeq

    torch.manual_seed(0)
    n_kv, group, hd, bs = 2, 3, 16, 16
    start, n = 100, attention.SPLIT_MIN_NEW + 20
    total = start + n
    cache = torch.zeros(kv_cache_shape(1, -(-total // bs) + 1, bs, n_kv, hd), dtype=dtype)
    cache[:, 0, :, :start] = torch.randn(2, n_kv, start, hd, dtype=dtype)
    q = torch.randn(n, n_kv * group, hd, dtype=dtype)
    k, v = torch.randn(n, n_kv, hd, dtype=dtype), torch.randn(n, n_kv, hd, dtype=dtype)
    slots = torch.arange(total)
    outs = []
    for split in (True, False):
        old = attention.SPLIT_MIN_NEW
        attention.SPLIT_MIN_NEW = n if split else n + 1
        try:
            meta = AttentionMetadata(slots[start:], 0, prefills=[PrefillSeq(0, n, start, slots)])
            outs.append(PagedAttention(cache.clone(), meta, n_kv * group, bs).attend(0, q, k, v))
        finally:
            attention.SPLIT_MIN_NEW = old
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=tol, rtol=tol)


def _prefill_kernel_applies() -> bool:
    kern = cpu_kernels()
    return kern is not None and kern.prefill_attention_applies(torch.empty(1, 1, 64, dtype=torch.bfloat16), 64)


@pytest.mark.skipif(not _prefill_kernel_applies(), reason="the kernels are not built with AVX512-BF16 here")
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("case", ["from_zero", "after_context", "long_after_context", "sparse", "one_token"])
def test_prefill_kernel_matches_the_sdpa_paths(monkeypatch, case, hd):
    """The compiled prefill attention (bf16) gives what the SDPA paths give, for a chunk from
    position 0, a chunk after cached context (short: one masked call; long: the split path), the
    sparse positions of a blend piece, and one token; GQA with 3 query heads per KV head."""
    from worker import attention
    from worker.attention import PrefillSeq

    torch.manual_seed(1)
    n_kv, group, bs, dtype = 2, 3, 16, torch.bfloat16
    start, n = {"from_zero": (0, 77), "after_context": (100, 50), "sparse": (0, 40), "one_token": (0, 1),
                "long_after_context": (70, attention.SPLIT_MIN_NEW + 9)}[case]
    total = 300 if case == "sparse" else start + n
    num_slots = (-(-total // bs) + 2) * bs
    cache = torch.zeros(kv_cache_shape(1, num_slots // bs, bs, n_kv, hd), dtype=dtype)
    slots = torch.randperm(num_slots)[:total]  # scattered, as a block table makes them
    cache[:, 0][:, :, slots] = torch.randn(2, n_kv, total, hd, dtype=dtype)
    qkv = torch.randn(n, n_kv * group + 2 * n_kv, hd, dtype=dtype)  # q is a strided view, as in the model
    q, k, v = qkv[:, :n_kv * group], qkv[:, n_kv * group:n_kv * (group + 1)], qkv[:, n_kv * (group + 1):]
    if case == "sparse":
        positions = torch.sort(torch.randperm(total)[:n]).values
        seq = PrefillSeq(0, n, int(positions[0]), slots[:int(positions[-1]) + 1], positions)
        new_slots = slots[positions]
    else:
        seq = PrefillSeq(0, n, start, slots if start else None)
        new_slots = slots[start:]
    outs = []
    for kernel in (True, False):
        monkeypatch.setattr(attention, "PREFILL_KERNEL", kernel)
        meta = AttentionMetadata(new_slots, 0, prefills=[seq])
        outs.append(PagedAttention(cache.clone(), meta, n_kv * group, bs).attend(0, q, k, v))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not _prefill_kernel_applies(), reason="the kernels are not built with AVX512-BF16 here")
def test_prefill_kernel_refuses_bad_inputs():
    kern = cpu_kernels()
    cache = torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    q = torch.zeros(4, 6, 64, dtype=torch.bfloat16)
    none = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="sees past its keys"):
        kern.prefill_attention(q, cache, cache, torch.arange(3), none, 0, 0.125)
    with pytest.raises(RuntimeError, match="ascend"):
        kern.prefill_attention(q, cache, cache, torch.arange(10), torch.tensor([3, 2, 4, 5]), 0, 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        kern.prefill_attention(q.float(), cache, cache, torch.arange(4), none, 0, 0.125)


def test_a_build_killed_midway_does_not_hang_later_loads():
    """torch's build lock is a plain file: a build killed midway leaves it, and every later load
    waited for it forever (workers hung on their first request). A fresh process loads the kernels
    with such a file in the build folder (and without the mark of a load that succeeded), and marks
    the folder ready again."""
    stale, ready = kernel_build_dir() / "lock", kernel_build_dir() / "ready"
    stale.write_text("")
    ready.unlink(missing_ok=True)
    try:
        done = subprocess.run([sys.executable, "-c", LOAD], timeout=300, cwd=Path(__file__).parents[2])
        assert done.returncode == 0
        assert not stale.exists() and ready.is_file()
    finally:
        stale.unlink(missing_ok=True)


LOAD = "from worker.kernels import cpu_kernels; import sys; sys.exit(cpu_kernels() is None)"


def test_a_ready_build_is_imported_without_the_build_tools():
    """Once a load of a build folder succeeded, later processes import its library as it is: torch's
    loader (which runs ninja to check the build, ~0.2 s of every worker's start) is not imported."""
    cpu_kernels()  # this process built or loaded it: the folder is ready
    assert (kernel_build_dir() / "ready").is_file()
    code = LOAD.replace("sys.exit(", "sys.exit('torch.utils.cpp_extension' in sys.modules or ")
    done = subprocess.run([sys.executable, "-c", code], timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0


def test_kernels_refuse_tensors_on_another_device() -> None:
    """A CUDA (here: meta) tensor handed to a CPU kernel is an error naming the kernel, never a
    dereferenced device pointer."""
    k = cpu_kernels()
    meta = torch.empty(4, 2, 8, device="meta")
    with pytest.raises(RuntimeError, match="rope_inplace: CPU tensors only"):
        k.rope_inplace(meta, torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="decode_attention: CPU tensors only"):
        k.decode_attention(meta, torch.zeros(2, 16, 8), torch.zeros(2, 16, 8), torch.zeros(4, 1, dtype=torch.long),
                           torch.ones(4, dtype=torch.long), 16, 1.0, False)
    with pytest.raises(RuntimeError, match="write_kv: CPU tensors only"):
        cache = torch.zeros(2, 16, 8)
        k.write_kv(meta, meta, cache, cache, torch.zeros(4, dtype=torch.long))
