"""The DRAM tier's pool is pinned slab by slab on CUDA machines (no GPU here: the slab arithmetic
and the CPU path are what runs)."""
from __future__ import annotations

import torch

from kvstore.codec import KVLayout
from kvstore.dram import DRAMTier, slabs


def test_slabs_cover_the_pool_exactly() -> None:
    assert slabs(0) == []
    assert slabs(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert slabs(8, 4) == [(0, 4), (4, 4)]
    sizes = slabs(40 * 2**30 + 5)
    assert sum(s for _, s in sizes) == 40 * 2**30 + 5 and max(s for _, s in sizes) == 2**30


def test_pool_is_exactly_its_entries_and_round_trips() -> None:
    layout = KVLayout(torch.bfloat16, (2, 3, 2, 4, 8))
    tier = DRAMTier(layout, 10 * layout.nbytes + 1)
    assert tier.pool.shape == (10, layout.nbytes)  # no power-of-two rounding
    value = torch.randn(layout.shape).to(torch.bfloat16)
    assert tier.put_many([b"k" * 16], [value]) == 1
    (back,) = tier.get_many([b"k" * 16])
    assert torch.equal(back, value)
    tier.close()
