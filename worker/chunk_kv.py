"""Chunk-caches as tensors: re-rotating keys, placing a cache into a request's slots, re-basing a
computed chunk for the store, and the per-layer correction of a blend piece (the plan and its
reasons are in worker/chunk_blend.py).

RoPE is relative: a key rotated for position q becomes the key for q + d by one more rotation by
d (values carry no position), so a cache computed at positions 0..n-1 is placed at p by rotating
its keys by p, and a chunk computed at s is stored by rotating its keys by -s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.chunk_blend import CorrectionGroup


def rotate_keys_(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> None:
    """Re-rotate RoPE keys [..., T, head_dim] (half-split layout) in place by `delta` positions."""
    if delta == 0:
        return
    angle = delta * inv_freq.to(device=keys.device, dtype=torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = keys.float().chunk(2, dim=-1)
    keys.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, D] (half-split layout) by per-row angles given as cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def place_chunk_(kv_cache: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, start: int,
                 inv_freq: torch.Tensor) -> None:
    """Write a chunk-cache [2, L, H, n, D] (keys for positions 0..n-1) into `slots`, keys rotated to
    positions start..start+n-1."""
    kv = kv.to(device=kv_cache.device, dtype=kv_cache.dtype, copy=True)
    rotate_keys_(kv[0], start, inv_freq)
    kv_cache[:, :, :, slots] = kv


def rebased_chunk(kv_cache: torch.Tensor, slots: torch.Tensor, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """The KV [2, L, H, n, D] of a chunk computed at `start` (in `slots`), re-based to position 0."""
    kv = kv_cache[:, :, :, slots].clone()
    rotate_keys_(kv[0], -start, inv_freq)
    return kv


@dataclass
class _Group:
    sample_rows: torch.Tensor
    other_slots: torch.Tensor
    other_cos: torch.Tensor
    other_sin: torch.Tensor


class ChunkCorrection:
    """The dense correction of one blend piece, applied by the attention backend at every layer
    before the piece's fresh KV is written: each group's mean deviation of its sampled tokens' KV
    (keys un-rotated to position 0) is added to its other tokens' cached KV."""

    def __init__(self, groups: list[CorrectionGroup], positions: torch.Tensor, slots_of, cos_table: torch.Tensor,
                 sin_table: torch.Tensor) -> None:
        """`slots_of(positions)`: the request's slots of a position tensor; cos/sin tables [max_len, D/2]."""
        device = cos_table.device
        self.groups = []
        for g in groups:
            others = torch.tensor(g.other_positions, dtype=torch.long, device=device)
            self.groups.append(_Group(torch.tensor(g.sample_rows, dtype=torch.long, device=device),
                                      slots_of(others), cos_table[others], sin_table[others]))
        self.cos, self.sin = cos_table[positions], sin_table[positions]

    def apply(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
        """k, v [T, H, D]: the piece's fresh KV at this layer; slots [T]: where it goes."""
        old_k = k_cache.index_select(1, slots).transpose(0, 1).float()
        old_v = v_cache.index_select(1, slots).transpose(0, 1).float()
        dk = rope_rotate(k.float() - old_k, self.cos, -self.sin)  # back to position 0
        dv = v.float() - old_v
        for g in self.groups:
            mk, mv = dk[g.sample_rows].mean(0), dv[g.sample_rows].mean(0)  # [H, D]
            n = g.other_slots.numel()
            add_k = rope_rotate(mk.expand(n, -1, -1), g.other_cos, g.other_sin)
            k_cache.index_add_(1, g.other_slots, add_k.transpose(0, 1).to(k_cache.dtype))
            v_cache.index_add_(1, g.other_slots, mv.expand(n, -1, -1).transpose(0, 1).to(v_cache.dtype))
