"""Reusing chunk-caches at any position: re-rotation and selective recomputation (CacheBlend-style).

A chunk-cache is the KV of a reusable piece of text (a retrieved passage, a tool output) computed
once, at positions [base, base + n). Placed at position p of another prompt:
- its keys are re-rotated by p - base: RoPE rotates each pair of key dims by position x frequency,
  rotations compose, so a key rotated for position q becomes the key for q + d by one more rotation
  by d (values carry no position);
- a selected set of its tokens is recomputed in the new context: those tokens run through every
  layer at their new positions, and at each layer attend to everything before them, where the
  unselected positions keep their cached KV and the selected ones have their fresh KV (written
  first). With every token selected this is exactly a full prefill (the test of the mechanism).

This module holds the mechanism over an engine's paged KV cache: `compute_chunk_cache`,
`place_chunk_cache` (copy + re-rotate), the sparse prefill of chosen positions,
`deviation_select` (CacheBlend: recompute the first layers of every reused token, keep the tokens
whose values there moved most) and `blended_prefill_logits`, which builds a prompt from computed
text and chunk-caches. Cache-Craft's per-chunk scores, the store of chunk-caches, the engine's
scheduling of such requests and the request API come on top of it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.attention import AttentionMetadata, PagedAttention, PrefillSeq
from worker.model import rope_inv_freq


@dataclass
class ChunkCache:
    token_ids: list[int]
    kv: torch.Tensor
    """[2, n_layers, n_kv_heads, n, head_dim]: K (rotated for positions base..base+n-1) and V."""
    base: int = 0


def rotate_keys_(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> None:
    """Re-rotate RoPE keys [..., T, head_dim] (half-split layout) in place by `delta` positions."""
    if delta == 0:
        return
    angle = delta * inv_freq.to(torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = keys.float().chunk(2, dim=-1)
    keys.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


class _Sequence:
    """One prompt's blocks in an engine's cache, for building it piece by piece."""

    def __init__(self, engine, total_len: int, seq_id: str) -> None:
        self.engine, self.seq_id = engine, seq_id
        self.bm, self.runner, self.model = engine.block_manager, engine.runner, engine.model
        self.bs = self.bm.block_size
        if not self.bm.allocate_slots(seq_id, total_len):
            raise RuntimeError(f"not enough free KV blocks for {total_len} tokens")
        self.block_table = torch.tensor(self.bm.get_block_table(seq_id), dtype=torch.long)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        return self.block_table[positions // self.bs] * self.bs + positions % self.bs

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], positions: torch.Tensor, sparse: bool = False,
                num_layers: int | None = None, correction=None, last: int = 0) -> torch.Tensor | None:
        """Compute and store the KV of `token_ids` at `positions` (sorted); each attends to every
        position up to its own (`sparse`: through the per-position mask even when they are
        contiguous). Returns the last token's logits (with `num_layers`: only the first layers'
        KV is computed, and nothing is returned; with `last`, the logits of that many trailing tokens)."""
        n = len(token_ids)
        contiguous = not sparse and bool(n == 1 or torch.all(positions[1:] - positions[:-1] == 1))
        start = int(positions[0])
        if contiguous and start == 0:
            seq = PrefillSeq(0, n, 0, None)
        elif contiguous:
            seq = PrefillSeq(0, n, start, self.slots(torch.arange(start + n)))
        else:
            seq = PrefillSeq(0, n, start, self.slots(torch.arange(int(positions[-1]) + 1)), positions, correction)
        meta = AttentionMetadata(self.slots(positions), 0, prefills=[seq])
        backend = PagedAttention(self.runner.kv_cache, meta, self.model.args.n_heads, self.bs)
        hidden = self.model(torch.tensor(list(token_ids), dtype=torch.long), positions, backend, num_layers)
        if hidden is None:
            return None
        return self.model.compute_logits(hidden[-last:]) if last else self.model.compute_logits(hidden[-1:])[0]

    def read(self, start: int, n: int) -> torch.Tensor:
        """The KV of positions [start, start + n): [2, n_layers, n_kv_heads, n, head_dim] (a copy)."""
        return self.runner.kv_cache[:, :, :, self.slots(torch.arange(start, start + n))].clone()

    def write(self, start: int, kv: torch.Tensor) -> None:
        self.runner.kv_cache[:, :, :, self.slots(torch.arange(start, start + kv.shape[3]))] = kv

    def free(self) -> None:
        self.bm.free(self.seq_id)


def compute_chunk_cache(engine, token_ids: Sequence[int], prefix: Sequence[int] = ()) -> ChunkCache:
    """The KV of `token_ids` computed on its own (after `prefix`, e.g. a shared instruction, when given)."""
    tokens = [*prefix, *token_ids]
    seq = _Sequence(engine, len(tokens), "chunk-cache")
    try:
        seq.forward(tokens, torch.arange(len(tokens)))
        return ChunkCache(list(token_ids), seq.read(len(prefix), len(token_ids)), base=len(prefix))
    finally:
        seq.free()


def place_chunk_cache(engine, seq: _Sequence, cache: ChunkCache, position: int) -> None:
    kv = cache.kv.clone()
    rotate_keys_(kv[0], position - cache.base, rope_inv_freq(engine.args))
    seq.write(position, kv)


Piece = list[int] | ChunkCache
Selector = Callable[[int, ChunkCache], Sequence[int]]
"""(position of the chunk in the prompt, the chunk) -> offsets within the chunk to recompute."""


def deviation_select(seq: _Sequence, positions: list[int], token_ids: list[int], ratio: float,
                     layer: int = 1) -> list[int]:
    """CacheBlend's selection: recompute layers 0..`layer` for every reused token (their KV there is
    then fresh), and pick the `ratio` share of tokens whose value vectors at `layer` moved most from
    the cached ones (L2 over heads). Returns the chosen positions, sorted."""
    pos = torch.tensor(positions)
    slots = seq.slots(pos)
    cached = seq.runner.kv_cache[1, layer][:, slots].float().clone()
    seq.forward(token_ids, pos, sparse=True, num_layers=layer + 1)
    fresh = seq.runner.kv_cache[1, layer][:, slots].float()
    deviation = (fresh - cached).pow(2).sum(dim=(0, 2))
    k = min(len(positions), max(0, round(ratio * len(positions))))
    chosen = torch.topk(deviation, k).indices if k else torch.empty(0, dtype=torch.long)
    return sorted(positions[i] for i in chosen.tolist())


def blended_prefill_logits(engine, pieces: Sequence[Piece], select: Selector | None = None,
                           deviation_ratio: float | None = None, deviation_layer: int = 1) -> torch.Tensor:
    """Logits after the last token of a prompt made of computed text (token id lists) and
    chunk-caches, recomputing the tokens `select` picks in each chunk, or (`deviation_ratio`) the
    share CacheBlend's KV-deviation selection picks among the reused tokens before each text piece.
    The last piece must be text."""
    if (select is None) == (deviation_ratio is None):
        raise ValueError("give exactly one of select and deviation_ratio")
    if not pieces or isinstance(pieces[-1], ChunkCache):
        raise ValueError("the prompt must end with text to compute (e.g. the question)")
    total = sum(len(p.token_ids) if isinstance(p, ChunkCache) else len(p) for p in pieces)
    seq = _Sequence(engine, total, "blend")
    try:
        pos, selected_pos, selected_tok, logits = 0, [], [], None
        for i, piece in enumerate(pieces):
            if isinstance(piece, ChunkCache):
                place_chunk_cache(engine, seq, piece, pos)
                offsets = range(len(piece.token_ids)) if select is None else sorted(set(select(pos, piece)))
                for off in offsets:
                    selected_pos.append(pos + off)
                    selected_tok.append(piece.token_ids[off])
                pos += len(piece.token_ids)
                continue
            if selected_pos and deviation_ratio is not None:  # narrow the reused tokens to the most deviant
                token_at = dict(zip(selected_pos, selected_tok))
                selected_pos = deviation_select(seq, selected_pos, selected_tok, deviation_ratio, deviation_layer)
                selected_tok = [token_at[p] for p in selected_pos]
            if selected_pos:  # recompute the chunks' selected tokens before the text that follows
                seq.forward(selected_tok, torch.tensor(selected_pos), sparse=True)
                selected_pos, selected_tok = [], []
            if not piece:
                continue
            logits = seq.forward(piece, torch.arange(pos, pos + len(piece)))
            pos += len(piece)
        return logits
    finally:
        seq.free()
