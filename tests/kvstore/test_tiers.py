"""One behavioural suite run against every KV tier (`TIER_KINDS`), plus the DRAM pool's no-allocation promise.

To run the suite against a new tier, add its kind to `TIER_KINDS`: a factory that builds it for a
layout, a capacity in bytes, a policy and a private scratch directory, and the bytes one entry
takes in it (so that the tests can ask for a capacity in entries).
"""
from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kvstore.codec import KVLayout
from kvstore.dram import DRAMTier
from kvstore.eviction import CostAwarePolicy, EvictionPolicy, LRUPolicy
from kvstore.ssd import SSDTier, slot_size
from kvstore.tier import KVTier, TierConfigError

BF16 = KVLayout(torch.bfloat16, (2, 3, 4, 8))
F32 = KVLayout(torch.float32, (2, 5, 7))


@dataclass(frozen=True)
class TierKind:
    build: Callable[[KVLayout, float, EvictionPolicy | None, Path], KVTier]
    entry_bytes: Callable[[KVLayout], int]


TIER_KINDS: dict[str, TierKind] = {
    "dram": TierKind(lambda layout, cap, policy, scratch: DRAMTier(layout, cap, policy=policy),
                     lambda layout: layout.nbytes),
    "ssd": TierKind(lambda layout, cap, policy, scratch: SSDTier(layout, cap, scratch, policy=policy), slot_size),
}


@pytest.fixture(params=list(TIER_KINDS))
def kind(request) -> str:
    return request.param


@pytest.fixture
def make_tier(tmp_path: Path):
    """`make(kind, layout, capacity_entries, policy=None)` -> a new tier; all are closed at the end."""
    made: list[KVTier] = []

    def make(kind: str, layout: KVLayout, capacity_entries: float, policy: EvictionPolicy | None = None) -> KVTier:
        spec = TIER_KINDS[kind]
        tier = spec.build(layout, capacity_entries * spec.entry_bytes(layout), policy, tmp_path / f"{kind}-{len(made)}")
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def random_entry(layout: KVLayout, gen: torch.Generator) -> torch.Tensor:
    """Random bits (NaN and inf patterns included), so that only an exact byte copy compares equal."""
    raw = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(layout.dtype).view(layout.shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("layout", [BF16, F32], ids=str)
def test_round_trip_exact_bytes(kind, make_tier, layout):
    gen = torch.Generator().manual_seed(1)
    tier = make_tier(kind, layout, 8)
    values = {key(i): random_entry(layout, gen) for i in range(5)}
    for k, v in values.items():
        assert tier.put(k, v)
    assert len(tier) == 5 and sorted(tier.keys()) == sorted(values)
    for k, v in values.items():
        assert tier.contains(k)
        got = tier.get(k)
        assert same_bytes(got, v)
    out = torch.empty(layout.shape, dtype=layout.dtype)
    assert tier.get(key(3), out=out) is out and same_bytes(out, values[key(3)])

    assert tier.put(key(0), random_entry(layout, gen))  # an existing key is only touched
    assert same_bytes(tier.get(key(0)), values[key(0)])
    assert tier.remove(key(0)) and not tier.remove(key(0))
    assert not tier.contains(key(0)) and tier.get(key(0)) is None and len(tier) == 4
    assert tier.stats.puts == 5 and tier.stats.hits == 7 and tier.stats.misses == 1


def test_non_contiguous_value_is_stored_in_layout_order(kind, make_tier):
    tier = make_tier(kind, BF16, 2)
    value = random_entry(KVLayout(BF16.dtype, (8, 4, 3, 2)), torch.Generator().manual_seed(2)).permute(3, 2, 1, 0)
    assert not value.is_contiguous()
    tier.put(key(1), value)
    assert same_bytes(tier.get(key(1)), value)


def test_get_returns_a_copy(kind, make_tier):
    gen = torch.Generator().manual_seed(3)
    tier = make_tier(kind, BF16, 4)
    value = random_entry(BF16, gen)
    original = value.clone()
    tier.put(key(1), value)
    value.fill_(7)  # the tier copied on put ...
    got = tier.get(key(1))
    assert same_bytes(got, original)
    got.fill_(3)  # ... and copies on get
    out = tier.get(key(1), out=torch.empty_like(original))
    out.fill_(5)
    assert same_bytes(tier.get(key(1)), original)


def test_batched_operations(kind, make_tier):
    gen = torch.Generator().manual_seed(4)
    tier = make_tier(kind, F32, 8)
    keys = [key(i) for i in range(6)]
    values = [random_entry(F32, gen) for _ in keys]
    assert tier.put_many(keys[:4], values[:4], costs=[1.0, 2.0, 3.0, 4.0]) == 4
    assert tier.contains_many(keys) == [True] * 4 + [False] * 2
    got = tier.get_many([keys[2], keys[5], keys[0]])
    assert same_bytes(got[0], values[2]) and got[1] is None and same_bytes(got[2], values[0])
    assert tier.remove_many([keys[1], keys[5], keys[2]]) == 2
    assert tier.contains_many(keys) == [True, False, False, True, False, False]


def test_capacity_is_never_exceeded(kind, make_tier):
    gen = torch.Generator().manual_seed(5)
    tier = make_tier(kind, BF16, 4)
    assert tier.capacity == 4
    for i in range(10):
        assert tier.put(key(i), random_entry(BF16, gen))
        assert len(tier) == min(i + 1, 4) and len(tier.keys()) == len(tier)
    assert tier.stats.evictions == 6 and tier.contains_many([key(i) for i in range(10)]) == [False] * 6 + [True] * 4


def test_lru_eviction_order_and_hook(kind, make_tier):
    gen = torch.Generator().manual_seed(6)
    tier = make_tier(kind, BF16, 4, LRUPolicy())
    values = {key(i): random_entry(BF16, gen) for i in range(1, 9)}
    evicted: list[tuple[bytes, torch.Tensor]] = []
    tier.on_evict = lambda k, v: evicted.append((k, v.clone()))
    for i in (1, 2, 3, 4):
        tier.put(key(i), values[key(i)])  # recency, oldest first: 1 2 3 4
    tier.get(key(1))                      # 2 3 4 1
    tier.put(key(5), values[key(5)])      # evicts 2 -> 3 4 1 5
    tier.get(key(3))                      # 4 1 5 3
    tier.put(key(6), values[key(6)])      # evicts 4 -> 1 5 3 6
    tier.put(key(1), values[key(1)])      # a put of a held key touches it: 5 3 6 1
    tier.put(key(7), values[key(7)])      # evicts 5 -> 3 6 1 7
    tier.contains(key(3))                 # contains is no use: 3 stays oldest
    tier.put(key(8), values[key(8)])      # evicts 3 -> 6 1 7 8
    assert [k for k, _ in evicted] == [key(2), key(4), key(5), key(3)]
    for k, v in evicted:
        assert same_bytes(v, values[k])
    assert sorted(tier.keys()) == [key(1), key(6), key(7), key(8)]
    assert all(same_bytes(tier.get(k), values[k]) for k in tier.keys())


def test_eviction_goes_on_when_the_hook_fails(kind, make_tier):
    tier = make_tier(kind, BF16, 1)
    tier.on_evict = lambda k, v: 1 / 0
    gen = torch.Generator().manual_seed(7)
    tier.put(key(1), random_entry(BF16, gen))
    assert tier.put(key(2), random_entry(BF16, gen))
    assert tier.keys() == [key(2)] and tier.stats.evictions == 1


def test_cost_aware_keeps_an_expensive_hot_entry(kind, make_tier):
    gen = torch.Generator().manual_seed(8)
    expensive = random_entry(BF16, gen)
    for policy, kept in ((CostAwarePolicy(), True), (LRUPolicy(), False)):
        tier = make_tier(kind, BF16, 3, policy)
        assert tier.policy is policy
        evicted: list[bytes] = []
        tier.on_evict = lambda k, v: evicted.append(k)
        tier.put(key(100), expensive, cost=10.0)
        for _ in range(3):
            assert tier.get(key(100)) is not None
        for i in range(8):  # a stream of cheap entries, each seen once
            tier.put(key(i), random_entry(BF16, gen), cost=1.0)
        assert tier.contains(key(100)) is kept, policy.name
        if kept:
            assert evicted == [key(i) for i in range(6)]
            assert same_bytes(tier.get(key(100)), expensive)
        else:
            assert evicted[0] == key(100)


def test_wrong_layout_is_refused(kind, make_tier):
    tier = make_tier(kind, BF16, 2)
    with pytest.raises(ValueError, match="holds"):
        tier.put(key(1), torch.zeros(BF16.shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="holds"):
        tier.put(key(1), torch.zeros((2, 3, 4, 9), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="holds"):
        tier.put(key(1), torch.zeros(BF16.nbytes // 2, dtype=torch.bfloat16))  # same bytes, other shape
    assert len(tier) == 0 and tier.stats.puts == 0
    tier.put(key(1), torch.ones(BF16.shape, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="holds"):
        tier.get(key(1), out=torch.empty(BF16.shape, dtype=torch.float32))


@pytest.mark.parametrize("entries", [0, -1, 0.5], ids=["zero", "negative", "less-than-one-entry"])
def test_bad_capacity_is_a_config_error(kind, make_tier, entries):
    with pytest.raises(TierConfigError, match="capacity"):
        make_tier(kind, BF16, entries)


# --- DRAM: one pool, no allocation per put ---------------------------------------------------


def _allocations(fn: Callable[[], None]) -> tuple[int, int]:
    """(largest torch CPU allocation, peak Python/numpy heap use) of `fn`, in bytes; runs it twice."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    torch_max = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return torch_max, peak


def test_dram_put_allocates_nothing_and_stores_in_the_pool():
    layout = KVLayout(torch.bfloat16, (2, 4, 4, 16, 64))  # 64 KiB, far above any bookkeeping object
    tier = DRAMTier(layout, 8 * layout.nbytes, pin_memory=False)
    assert tier.pool.shape == (8, layout.nbytes) and tier.pool.dtype == torch.uint8
    pool_ptr = tier.pool.data_ptr()
    gen = torch.Generator().manual_seed(9)
    values = [random_entry(layout, gen) for _ in range(16)]
    strided = random_entry(layout, gen).transpose(0, 1).contiguous().transpose(0, 1)

    def puts() -> None:
        for i in range(1000):  # the tier is full from the 9th put on: each put also evicts
            tier.put(key(i), values[i % 16])
        tier.put(key(5000), strided)

    torch_max, heap_peak = _allocations(puts)
    assert torch_max < layout.nbytes and heap_peak < layout.nbytes
    assert tier.pool.data_ptr() == pool_ptr and len(tier) == 8
    for k in tier.keys():
        slot = tier._slots[k]  # the stored bytes are the pool's row
        assert torch.equal(tier.get(k).view(-1).view(torch.uint8), tier.pool[slot])

    # The probes do see an allocation of one entry: a get's copy (numpy), a clone (torch).
    assert _allocations(lambda: tier.get(key(999)))[1] >= layout.nbytes
    assert _allocations(lambda: values[0].clone())[0] >= layout.nbytes
