"""The GPU attention path (Triton decode kernel, SDPA prefill with a lower-right causal mask),
checked on the CPU: no GPU runs in CI, so the Triton kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before anything imports triton) on CPU tensors. The same kernels compile for
the GPU in scripts/device-check.sh, which compares them there against the same reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (make setup installs it)")
from worker.triton_attention import num_splits_for, paged_decode_attention  # noqa: E402
from kvweave.sampling_params import SamplingParams  # noqa: E402

from engine_reference import reference_greedy  # noqa: E402


def reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    """Per sequence: gather its context slot by slot, attend in fp32."""
    b, h, hd = q.shape
    group = h // k_cache.shape[0]
    out = torch.empty(b, h, hd)
    for i in range(b):
        t = torch.arange(int(lens[i]))
        slots = tables[i][t // block_size] * block_size + t % block_size
        k = k_cache[:, slots].float().repeat_interleave(group, 0)
        v = v_cache[:, slots].float().repeat_interleave(group, 0)
        probs = (torch.einsum("hd,hnd->hn", q[i].float(), k) * scale).softmax(-1)
        out[i] = torch.einsum("hn,hnd->hd", probs, v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, hd, block_size, splits", [
    (9, 3, 64, 16, None),  # the default model's shape
    (4, 4, 32, 4, 3),      # no GQA, more splits than some contexts have tokens
    (8, 2, 48, 8, 2),      # a head_dim that is no power of two
])
def test_decode_kernel_matches_reference(dtype, heads, kv_heads, hd, block_size, splits) -> None:
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 37, 130, 64])
    num_blocks = 64
    k_cache = torch.randn(kv_heads, num_blocks * block_size, hd, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, hd, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:40] for _ in lens])  # scattered blocks
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, hd, generator=g).to(dtype)
    q = qkv[:, :heads]  # rows strided, as q's part of the fused qkv output
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, hd ** -0.5, int(lens.max()),
                                 num_splits=splits, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, tables, lens, block_size, hd ** -0.5),
                               **tol)


def test_decode_kernel_refuses_bad_shapes() -> None:
    q = torch.randn(2, 9, 64)
    cache = torch.randn(2, 64, 64)  # 2 KV heads do not divide 9 query heads
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q, cache, cache, torch.zeros(2, 4, dtype=torch.long), torch.tensor([3, 4]), 16,
                               0.125, 4)


def test_split_count_follows_context_length_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert num_splits_for(32, 3, 100, cpu) == 1
    assert num_splits_for(1, 3, 600, cpu) == 3


@pytest.mark.parametrize("block_size", [4, 16])
def test_engine_on_the_gpu_attention_path_matches_the_reference(block_size, monkeypatch, tiny_model_variant,
                                                                  tiny_engine_factory) -> None:
    """The whole engine with the GPU path's attention: decodes by the Triton kernel, prefill chunks
    after cached context (chunked prefill, a prefix-cache hit) by SDPA's lower-right causal mask."""
    monkeypatch.setenv("KVWEAVE_ATTENTION_BACKEND", "triton")
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=block_size, max_num_batched_tokens=16)
    vocab = engine.args.vocab_size
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, vocab, (21,), generator=g).tolist()
    prompts = [shared + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (2, 9)]
    prompts.append(torch.randint(3, vocab, (5,), generator=g).tolist())
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    (again,) = engine.generate([prompts[1]], params)  # its blocks are cached now: a chunk after them
    assert again.num_cached_tokens > 0
    for prompt, out in zip(prompts + [prompts[1]], outs + [again]):
        assert out.token_ids == reference_greedy(engine, prompt, 5)[0]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_graph_buffers_and_padding_keep_outputs(backend, monkeypatch, tiny_model_variant,
                                                      tiny_engine_factory) -> None:
    """The CUDA-graph path of decode steps (worker/cuda_graphs.py) without a GPU: `emulate` runs the
    forward on the static buffers, batches padded to their bucket with rows on the scratch block.
    Requests of different lengths finish at different steps, so the batch moves between buckets;
    every output still equals the reference, and the scratch block is never a request's."""
    monkeypatch.setenv("KVWEAVE_ATTENTION_BACKEND", backend)
    monkeypatch.setenv("KVWEAVE_CUDA_GRAPHS", "emulate")
    engine = tiny_engine_factory(tiny_model_variant("gqa"), block_size=4, num_blocks=64)
    assert engine.runner.kv_cache.shape[3] == 65 * 4 and engine.runner.graphs.scratch_block == 64
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, engine.args.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 6)]
    max_tokens = [9, 4, 6]
    outs = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                                     for n in max_tokens])
    assert sorted(engine.runner.graphs.graphs) == [1, 2, 4]  # 3 running, then 2, then 1
    for prompt, out, n in zip(prompts, outs, max_tokens):
        assert out.token_ids == reference_greedy(engine, prompt, n)[0]
