"""Paged attention on the CPU: gather + scaled_dot_product_attention.

The KV cache is one tensor [2, n_layers, n_kv_heads, num_slots, head_dim] (slot = block_id *
block_size + offset); heads lead so that gathering a context yields the [heads, tokens, hd]
layout attention wants without another copy. Each forward first writes the new tokens' K/V into
their slots, then:
- decodes (one new token each, first in the batch) are attended in one batched call: the
  compiled kernel of worker/csrc reads each sequence's blocks in place (~15x faster than the
  torch path here); without it, their context is gathered into [n_kv_heads, B, L_max, hd] and
  each group of query heads that shares a KV head is folded into extra query rows (no expanded
  KV), with padding masked out. Measured here:
  a matmul-based kernel in the model dtype is ~2x faster than SDPA for these shapes in bf16, and
  the heads-first layout ~2.5x faster than a tokens-first one.
- prefill chunks are attended one sequence at a time: in bf16 on AVX512-BF16 CPUs by the compiled
  kernel of worker/csrc/prefill_attention.cpp (keys read from their slots, the causal limit per
  query; ~2x the SDPA paths), elsewhere with SDPA on 4-D tensors (the fused CPU kernel;
  `enable_gqa` is 2-3x faster than expanding the KV heads), `is_causal` when the chunk starts at
  position 0 (1.7x faster than a mask), otherwise with an explicit mask over the cached context
  plus the chunk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from worker.chunk_kv import ChunkCorrection
from worker.kernels import cpu_kernels


@dataclass(slots=True)
class PrefillSeq:
    offset: int
    """Index of the chunk's first token in the flat batch."""
    num_new: int
    start_pos: int
    """Tokens already in the cache before this chunk."""
    context_slots: torch.Tensor | None
    """Slots of positions [0, start_pos + num_new) when start_pos > 0."""
    positions: torch.Tensor | None = None
    """Positions of the new tokens when they are not contiguous (selective recomputation of reused
    chunk caches): each attends to the context positions up to its own; `context_slots` then
    covers [0, max position]."""
    correction: ChunkCorrection | None = None
    """Applied at every layer before the new KV is written (a blend piece, worker/chunk_kv.py)."""
    score_layer: int | None = None
    """Record, at this layer, each new token's squared distance between its fresh value vectors and
    the cached ones it replaces (CacheBlend's deviation) into `scores`."""
    scores: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """Slot of each new token [T]."""
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None
    """[B, max_blocks] block ids of every decode (padded with 0)."""
    decode_context_lens: torch.Tensor | None = None
    """[B] tokens of context of every decode, its new token included."""
    decode_slots: torch.Tensor | None = None
    """[B, L_max] slots of every decode's context (padded)."""
    decode_bias: torch.Tensor | None = None
    """[1, B, 1, L_max] additive mask: 0 for context, -inf for padding."""
    decode_max_len: int = 0
    """The longest decode context (known on the host: no device sync to size the kernel's grid)."""
    prefills: list[PrefillSeq] = field(default_factory=list)


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slot of each position of a request, from its block table (slot = block_id *
    block_size + offset in the block)."""
    return block_table[positions // block_size] * block_size + positions % block_size


def kv_cache_shape(n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int) -> tuple:
    return (2, n_layers, n_kv_heads, num_blocks * block_size, head_dim)


BACKENDS = ("cpu", "triton", "torch")


def attention_backend(kv_cache: torch.Tensor) -> str:
    """How a forward over this cache attends: `cpu` (the compiled kernels of worker/csrc), `triton`
    (CUDA: the Triton decode kernel and SDPA prefill) or `torch` (gathers and SDPA anywhere).
    KVWEAVE_ATTENTION_BACKEND names one (tests run `triton` on the CPU under Triton's interpreter)."""
    forced = os.environ.get("KVWEAVE_ATTENTION_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"KVWEAVE_ATTENTION_BACKEND={forced!r}: one of {', '.join(BACKENDS)}")
        return forced
    if kv_cache.device.type == "cuda":
        return "triton"
    if kv_cache.device.type == "cpu" and kv_cache.dtype in (torch.float32, torch.bfloat16) and cpu_kernels():
        return "cpu"
    return "torch"


class PagedAttention:
    """Attention backend for one forward over the paged KV cache."""

    def __init__(self, kv_cache: torch.Tensor, meta: AttentionMetadata, n_heads: int, block_size: int,
                 fused_decode: bool = True) -> None:
        """`fused_decode`: decode-only forwards may run every layer in one compiled call (not when the
        layers' modules must run, as under tensor parallelism, whose all-reduces hook onto them)."""
        self.kv_cache, self.meta, self.block_size = kv_cache, meta, block_size
        self.allow_fused_decode = fused_decode
        self.backend = attention_backend(kv_cache)
        self.kernels = cpu_kernels() if self.backend == "cpu" else None
        self.prefill_kernel = (self.kernels is not None and PREFILL_KERNEL
                               and self.kernels.prefill_attention_applies(kv_cache, kv_cache.shape[4]))
        self.n_heads = n_heads
        self.group = n_heads // kv_cache.shape[2]
        self.scale = kv_cache.shape[4] ** -0.5

    def fused_decode_applies(self, num_tokens: int) -> bool:
        m = self.meta
        return (self.kernels is not None and FUSED_DECODE and self.allow_fused_decode and m.num_decodes == num_tokens
                and not m.prefills
                and m.decode_block_tables is not None)

    def fused_decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: list[torch.Tensor],
                     linear_layout: int, eps: float) -> torch.Tensor:
        m = self.meta
        return self.kernels.decode_forward(x, weights, linear_layout, cos, sin, self.kv_cache, m.slot_mapping,
                                           m.decode_block_tables, m.decode_context_lens, self.n_heads,
                                           self.kv_cache.shape[2], self.block_size, self.scale, eps)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]
        for p in self.meta.prefills:
            if p.score_layer == layer:
                sl = slice(p.offset, p.offset + p.num_new)
                cached = v_cache.index_select(1, self.meta.slot_mapping[sl]).transpose(0, 1).float()
                p.scores = (v[sl].float() - cached).pow(2).sum(dim=(1, 2))
            if p.correction is not None:
                sl = slice(p.offset, p.offset + p.num_new)
                p.correction.apply(k_cache, v_cache, k[sl], v[sl], self.meta.slot_mapping[sl])
        if self.kernels is not None:
            self.kernels.write_kv(k, v, k_cache, v_cache, self.meta.slot_mapping)
        else:
            k_cache.index_copy_(1, self.meta.slot_mapping, k.transpose(0, 1))
            v_cache.index_copy_(1, self.meta.slot_mapping, v.transpose(0, 1))
        nd = self.meta.num_decodes
        if nd == q.shape[0]:  # a decode-only step
            return self._decode(q, k_cache, v_cache)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache)
        for p in self.meta.prefills:
            sl = slice(p.offset, p.offset + p.num_new)
            out[sl] = self._prefill(p, q[sl], k[sl], v[sl], k_cache, v_cache)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        m = self.meta
        if self.kernels is not None:
            out = self.kernels.decode_attention(q, k_cache, v_cache, m.decode_block_tables,
                                                m.decode_context_lens, self.block_size, self.scale)
            return out.view(q.shape[0], -1)
        if self.backend == "triton":
            from worker.triton_attention import paged_decode_attention
            out = paged_decode_attention(q, k_cache, v_cache, m.decode_block_tables, m.decode_context_lens,
                                         self.block_size, self.scale, m.decode_max_len)
            return out.view(q.shape[0], -1)
        return self._decode_torch(q, k_cache, v_cache)

    def _decode_torch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        b, nh, hd = q.shape
        kvh = k_cache.shape[0]
        slots = self.meta.decode_slots
        shape = (kvh, *slots.shape, hd)
        k = k_cache.index_select(1, slots.view(-1)).view(shape)  # [kvh, B, L, hd]
        v = v_cache.index_select(1, slots.view(-1)).view(shape)
        qg = q.view(b, kvh, self.group, hd).transpose(0, 1)  # query heads sharing a KV head become rows
        scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scale + self.meta.decode_bias
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(0, 1).reshape(b, nh * hd)

    def _prefill(self, p: PrefillSeq, q, k, v, k_cache, v_cache) -> torch.Tensor:
        if self.prefill_kernel:
            keys = p.context_slots
            if keys is None:  # a chunk from position 0: its own keys, written above
                keys = self.meta.slot_mapping[p.offset:p.offset + p.num_new]
            positions = p.positions if p.positions is not None else _NO_POSITIONS
            return self.kernels.prefill_attention(q, k_cache, v_cache, keys, positions, p.start_pos, self.scale)
        if self.backend == "triton" and p.positions is None and p.start_pos > 0:
            return self._prefill_lower_right(p, q, k_cache, v_cache)
        if p.positions is None and p.start_pos > 0 and p.num_new >= SPLIT_MIN_NEW and _flash_cpu(q):
            return self._prefill_split(p, q, k, v, k_cache, v_cache)
        if p.positions is not None and _flash_cpu(q):
            return self._prefill_sparse(p, q, k_cache, v_cache)
        if p.start_pos > 0 or p.positions is not None:
            k4 = k_cache.index_select(1, p.context_slots)[None]
            v4 = v_cache.index_select(1, p.context_slots)[None]
        else:
            k4, v4 = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        q4 = q.transpose(0, 1)[None]
        mask = None
        if p.positions is not None:
            mask = torch.arange(p.context_slots.numel(), device=q.device)[None, :] <= p.positions[:, None]
        elif p.start_pos > 0:
            total = p.start_pos + p.num_new
            mask = torch.arange(total, device=q.device)[None, :] <= \
                torch.arange(p.start_pos, total, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.group > 1)
        return o[0].transpose(0, 1).reshape(p.num_new, -1)

    def _prefill_lower_right(self, p: PrefillSeq, q, k_cache, v_cache) -> torch.Tensor:
        """A chunk after cached context on the GPU: SDPA over the gathered context with a causal
        mask aligned to its lower right (query i sees keys up to start_pos + i), which runs as flash
        or memory-efficient attention without a mask built on the host. KV heads are expanded:
        those kernels take no GQA with this mask."""
        k4 = k_cache.index_select(1, p.context_slots).repeat_interleave(self.group, 0)[None]
        v4 = v_cache.index_select(1, p.context_slots).repeat_interleave(self.group, 0)[None]
        from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo (~1 s): GPU path only

        mask = causal_lower_right(p.num_new, p.context_slots.numel())
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k4, v4, attn_mask=mask)
        return o[0].transpose(0, 1).reshape(p.num_new, -1)

    def _prefill_split(self, p: PrefillSeq, q, k, v, k_cache, v_cache) -> torch.Tensor:
        """A long chunk after cached context, without a mask: attention over the context (no mask)
        and over the chunk itself (causal) as two flash calls, merged by their log-sum-exps.
        The masked call this replaces runs the unfused math path (~1.8x slower at 6k tokens)."""
        ctx = p.context_slots[:p.start_pos]
        q4 = q.transpose(0, 1)[None]
        kc = k_cache.index_select(1, ctx).repeat_interleave(self.group, 0)[None]
        vc = v_cache.index_select(1, ctx).repeat_interleave(self.group, 0)[None]
        kn = k.transpose(0, 1).repeat_interleave(self.group, 0)[None]
        vn = v.transpose(0, 1).repeat_interleave(self.group, 0)[None]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o1, lse1 = flash(q4, kc, vc, 0.0, False, scale=self.scale)
        o2, lse2 = flash(q4, kn, vn, 0.0, True, scale=self.scale)
        m = torch.maximum(lse1, lse2)
        w1, w2 = (lse1 - m).exp_().unsqueeze(-1), (lse2 - m).exp_().unsqueeze(-1)
        o = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
        return o[0].to(q.dtype).transpose(0, 1).reshape(p.num_new, -1)


    def _prefill_sparse(self, p: PrefillSeq, q, k_cache, v_cache) -> torch.Tensor:
        """A blend piece: queries at sorted, sparse positions, each attending to the context up to
        its own position. The context is taken in blocks of SPARSE_KEY_BLOCK keys: the queries
        past a block's end attend it whole (flash, no mask), those inside it through a mask, the
        ones before it not at all; the blocks' results are merged by their log-sum-exps. It skips
        the masked half of the query x context rectangle that one masked call computes (1.5x
        faster for 700 positions over a 5.8k context here)."""
        n, n_ctx = p.num_new, p.context_slots.numel()
        starts = torch.arange(0, n_ctx, SPARSE_KEY_BLOCK, device=q.device)
        ends = (starts + SPARSE_KEY_BLOCK).clamp(max=n_ctx)
        first = torch.searchsorted(p.positions, starts).tolist()  # first query reaching each block
        whole = torch.searchsorted(p.positions, ends - 1).tolist()  # first query past each block's end
        kc = k_cache.index_select(1, p.context_slots)
        vc = v_cache.index_select(1, p.context_slots)
        q4 = q.transpose(0, 1)[None]
        acc = q4.new_zeros(q4.shape, dtype=torch.float32)
        lse = torch.full(q4.shape[:3], float("-inf"), device=q.device)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for a, b, lo, mid in zip(starts.tolist(), ends.tolist(), first, whole):
            if lo == n:
                break
            kb = kc[:, a:b].repeat_interleave(self.group, 0)[None]
            vb = vc[:, a:b].repeat_interleave(self.group, 0)[None]
            if mid < n:
                _merge(acc, lse, slice(mid, n), *flash(q4[:, :, mid:], kb, vb, 0.0, False, scale=self.scale))
            if lo < mid:
                keys = torch.arange(a, b, device=q.device)
                mask = q.new_zeros(mid - lo, b - a).masked_fill_(keys[None, :] > p.positions[lo:mid, None],
                                                                 float("-inf"))
                _merge(acc, lse, slice(lo, mid),
                       *flash(q4[:, :, lo:mid], kb, vb, 0.0, False, attn_mask=mask, scale=self.scale))
        return acc[0].to(q.dtype).transpose(0, 1).reshape(n, -1)


def _merge(acc: torch.Tensor, lse: torch.Tensor, rows: slice, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """Fold one attention result over more keys into rows of a running (output, log-sum-exp)."""
    old = lse[:, :, rows]
    m = torch.maximum(old, out_lse)
    w_old, w_new = (old - m).exp().unsqueeze(-1), (out_lse - m).exp().unsqueeze(-1)
    acc[:, :, rows] = (acc[:, :, rows] * w_old + out.float() * w_new) / (w_old + w_new)
    lse[:, :, rows] = m + (w_old + w_new).squeeze(-1).log()


FUSED_DECODE = os.environ.get("KVWEAVE_FUSED_DECODE", "1") != "0"
"""Decode-only forwards run every layer in one compiled call (`PagedAttention.fused_decode`);
KVWEAVE_FUSED_DECODE=0 runs them layer by layer in Python (the same ops, the same results)."""
PREFILL_KERNEL = os.environ.get("KVWEAVE_PREFILL_KERNEL", "1") != "0"
"""Prefill chunks (bf16, AVX512-BF16, head_dim a multiple of 32) are attended by the compiled
kernel (worker/csrc/prefill_attention.cpp, ~2x torch's CPU flash attention); KVWEAVE_PREFILL_KERNEL=0
takes the SDPA paths below."""
_NO_POSITIONS = torch.empty(0, dtype=torch.long)
SPARSE_KEY_BLOCK = 512
"""Context keys per block of a blend piece's attention (256-2048 measured; 512 was fastest)."""
SPLIT_MIN_NEW = 512
"""New tokens from which a prefill chunk after cached context takes the split path."""


def _flash_cpu(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

