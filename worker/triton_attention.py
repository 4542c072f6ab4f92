"""Decode attention over the paged KV cache as a Triton kernel (the GPU path), split-K.

One program takes one (sequence, KV head, split of the context): every query head of the group
that shares the KV head (GQA) at once, so each K/V vector is read once for the group; the split's
tokens are walked in tiles of BLOCK_N, each token's slot looked up in the block table (slot =
block_id * block_size + offset), with an online softmax in fp32. A second kernel merges the splits
by their log-sum-exps (flash-decoding). Splitting the context keeps the GPU's multiprocessors busy
when a batch has few sequences and long contexts, where one program per (sequence, head) would
leave most of them idle.

Layouts are the engine's (worker/attention.py): q [B, H, hd] (rows may be strided, as q's part of a
fused qkv output), one layer's caches [KVH, slots, hd] contiguous, block tables [B, max_blocks]
and context lengths [B] as integer tensors on the device. On the CPU the same kernels run under
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them without a GPU; there
the tiles are widened to fp32 before their products (the interpreter's bf16 `tl.dot` is wrong).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MIN_TOKENS_PER_SPLIT = 256
"""A split walks at least this many tokens (fewer splits for short contexts: merging costs too)."""


@triton.jit
def _decode_split_kernel(Q, K, V, BT, LENS, O_PART, LSE_PART,
                         stride_qb, stride_qh, stride_kh, stride_btb, stride_ob, stride_oh, stride_os,
                         scale, tokens_per_split,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, D_PAD: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_FP32: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(LENS + b).to(tl.int32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < GROUP
    d_ok = d < HD
    heads = kvh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        block = tl.load(BT + b * stride_btb + t // BS, mask=t_ok, other=0)
        slot = block.to(tl.int64) * BS + t % BS
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kvh * stride_kh + slot[:, None] * HD + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kvh * stride_kh + slot[:, None] * HD + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has_keys = end > start
    out = tl.where(has_keys, acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(O_PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out,
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + (b * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + split, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(O_PART, LSE_PART, OUT, num_splits,
                         stride_ob, stride_oh, stride_os, stride_outb, stride_outh,
                         HD: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = s < num_splits
    d_ok = d < HD
    lse = tl.load(LSE_PART + (b * tl.num_programs(1) + h) * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    o = tl.load(O_PART + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_outb + h * stride_outh + d, out.to(OUT.dtype.element_ty), mask=d_ok)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(1, n) - 1).bit_length())


def num_splits_for(batch: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits of each context: enough programs for about two per multiprocessor, each split at
    least MIN_TOKENS_PER_SPLIT tokens."""
    if device.type != "cuda":
        return max(1, min(4, math.ceil(max_context_len / MIN_TOKENS_PER_SPLIT)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(want, math.ceil(max_context_len / MIN_TOKENS_PER_SPLIT)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, max_context_len: int, num_splits: int | None = None,
                           block_n: int = 64) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context; returns [B, H, hd] in q's
    dtype. `max_context_len`: the longest of `context_lens`, known on the host (no device sync)."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError("paged_decode_attention: q [B, H, hd], caches [KVH, slots, hd]")
    b, h, hd = q.shape
    kvh = k_cache.shape[0]
    if h % kvh or k_cache.shape[2] != hd:
        raise ValueError("paged_decode_attention: heads must be a multiple of KV heads, head dims equal")
    if q.stride(2) != 1 or q.stride(1) != hd or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_attention: q's heads contiguous within a row, caches contiguous")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device == context_lens.device):
        raise ValueError("paged_decode_attention: all tensors on one device")
    out = torch.empty(b, h, hd, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    group = h // kvh
    splits = num_splits or num_splits_for(b, kvh, max_context_len, q.device)
    per_split = -(-max(1, max_context_len) // splits)
    per_split = -(-per_split // block_n) * block_n  # whole tiles
    splits = -(-max(1, max_context_len) // per_split)
    o_part = torch.empty(b, h, splits, hd, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    bt = block_tables.contiguous()
    lens = context_lens.contiguous()
    d_pad = _pow2(hd, 16)
    _decode_split_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, bt, lens, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), bt.stride(0), o_part.stride(0), o_part.stride(1),
        o_part.stride(2), scale, per_split,
        GROUP=group, G_PAD=_pow2(group, 16), HD=hd, D_PAD=d_pad, BS=block_size, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 engines stay exact (no TF32)
        DOT_FP32=q.device.type == "cpu")  # Triton's interpreter multiplies bf16 tiles wrongly
    _merge_splits_kernel[(b, h)](
        o_part, lse_part, out, splits, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        out.stride(0), out.stride(1), HD=hd, D_PAD=d_pad, S_PAD=_pow2(splits))
    return out
