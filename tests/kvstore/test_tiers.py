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

# Block layouts of a paged KV cache: [K/V, layers, KV heads, block size, head dim].
BF16 = KVLayout(torch.bfloat16, (2, 3, 2, 4, 8))
F32 = KVLayout(torch.float32, (2, 1, 5, 2, 7))


@dataclass(frozen=True)
class TierKind:
    build: Callable[[KVLayout, float, EvictionPolicy | None, Path], KVTier]
    entry_bytes: Callable[[KVLayout], int]


def _device_tier(layout: KVLayout, capacity_bytes: float, policy: EvictionPolicy | None, scratch: Path) -> KVTier:
    """The engine's paged KV cache (block manager + cache tensor) seen as a tier; it evicts in the
    block manager's LRU order, so a cost-aware policy does not apply to it."""
    from worker.block_manager import BlockManager
    from worker.kv_connector_worker import DeviceTier

    if policy is not None and not isinstance(policy, LRUPolicy):
        raise ValueError("the device tier evicts in the block manager's LRU order")
    num_blocks = int(capacity_bytes // layout.nbytes) if capacity_bytes > 0 else 0
    if num_blocks < 1:
        raise TierConfigError(f"device cache capacity {capacity_bytes} holds no block of {layout}")
    two, n_layers, n_kv_heads, block_size, head_dim = layout.shape
    cache = torch.zeros((two, n_layers, n_kv_heads, num_blocks * block_size, head_dim), dtype=layout.dtype)
    return DeviceTier(BlockManager(num_blocks, block_size), cache)


TIER_KINDS: dict[str, TierKind] = {
    "device": TierKind(_device_tier, lambda layout: layout.nbytes),
    "dram": TierKind(lambda layout, cap, policy, scratch: DRAMTier(layout, cap, policy=policy),
                     lambda layout: layout.nbytes),
    "ssd": TierKind(lambda layout, cap, policy, scratch: SSDTier(layout, cap, scratch, policy=policy), slot_size),
}


POLICY_KINDS = [k for k in TIER_KINDS if k != "device"]
"""Tiers with a pluggable eviction policy (the device tier evicts in the block manager's LRU order)."""


@pytest.fixture(params=list(TIER_KINDS))
def kind(request) -> str:
    return request.param


@pytest.fixture(params=POLICY_KINDS)
def policy_kind(request) -> str:
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
    value = random_entry(KVLayout(BF16.dtype, (8, 4, 2, 3, 2)), torch.Generator().manual_seed(2)).permute(4, 3, 2, 1, 0)
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

    outs = [torch.empty(F32.shape, dtype=F32.dtype) for _ in range(4)]
    got = tier.get_many([keys[3], keys[5], keys[1], keys[3]], outs)
    assert got[0] is outs[0] and got[1] is None and got[2] is outs[2] and got[3] is outs[3]
    assert same_bytes(outs[0], values[3]) and same_bytes(outs[2], values[1]) and same_bytes(outs[3], values[3])
    got = tier.get_many([keys[0], keys[1]], [None, outs[1]])  # None: a new tensor
    assert same_bytes(got[0], values[0]) and got[1] is outs[1] and same_bytes(outs[1], values[1])
    assert tier.stats.hits == 7 and tier.stats.misses == 2
    with pytest.raises(ValueError, match="holds"):
        tier.get_many([keys[0]], [torch.empty(F32.shape, dtype=torch.float16)])
    with pytest.raises(ValueError):
        tier.get_many([keys[0], keys[1]], outs[:1])

    assert tier.remove_many([keys[1], keys[5], keys[2]]) == 2
    assert tier.contains_many(keys) == [True, False, False, True, False, False]


@pytest.mark.parametrize("policy", [LRUPolicy, CostAwarePolicy], ids=lambda p: p.name)
def test_batched_operations_act_as_a_loop_of_single_ones(policy_kind, make_tier, policy):
    """put_many/get_many against put/get in a loop, on two tiers fed the same: same results, same
    eviction order (hooks included), same contents and counts. The batch overflows the tier."""
    gen = torch.Generator().manual_seed(10)
    values = {key(i): random_entry(BF16, gen) for i in range(12)}
    tiers = [make_tier(policy_kind, BF16, 4, policy()) for _ in range(2)]
    seen: list[list] = [[], []]
    for tier, log in zip(tiers, seen):
        tier.on_evict = lambda k, v, log=log: log.append(("evict", k, v.clone()))
        tier.on_drop = lambda k, log=log: log.append(("drop", k))
        for i in (0, 1, 2):
            tier.put(key(i), values[key(i)])
        tier.get(key(0))
    batch = [key(i) for i in (3, 1, 4, 5, 3, 6, 7, 8, 9, 10)]  # 1 held, 3 repeated; 0 goes early
    costs = [float(1 + i % 3) for i in range(len(batch))]
    batched, looped = tiers
    assert batched.put_many(batch, [values[k] for k in batch], costs) == sum(
        looped.put(k, values[k], c) for k, c in zip(batch, costs))
    reads = [key(i) for i in (9, 0, 10, 7, 9, 11)]
    got = batched.get_many(reads)
    expected = [looped.get(k) for k in reads]
    assert [g is None for g in got] == [e is None for e in expected]
    assert all(same_bytes(g, values[k]) for g, k in zip(got, reads) if g is not None)
    batched.put_many([key(11)], [values[key(11)]])  # evicts by the recency the reads left
    looped.put(key(11), values[key(11)])
    for field in ("hits", "misses", "puts", "evictions", "corrupt"):
        assert getattr(batched.stats, field) == getattr(looped.stats, field), field
    assert [e[:2] for e in seen[0]] == [e[:2] for e in seen[1]] and len(seen[0]) == 2 * batched.stats.evictions >= 14
    assert all(same_bytes(e[2], values[e[1]]) for e in seen[0] if e[0] == "evict")
    assert sorted(batched.keys()) == sorted(looped.keys())
    assert all(same_bytes(batched.get(k), values[k]) for k in batched.keys())


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


def test_cost_aware_keeps_an_expensive_hot_entry(policy_kind, make_tier):
    gen = torch.Generator().manual_seed(8)
    expensive = random_entry(BF16, gen)
    for policy, kept in ((CostAwarePolicy(), True), (LRUPolicy(), False)):
        tier = make_tier(policy_kind, BF16, 3, policy)
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
        tier.put(key(1), torch.zeros((2, 3, 2, 4, 9), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="holds"):
        tier.put(key(1), torch.zeros(BF16.nbytes // 2, dtype=torch.bfloat16))  # same bytes, other shape
    assert len(tier) == 0 and tier.stats.puts == 0
    good = torch.ones(BF16.shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="holds"):  # checked before anything is stored
        tier.put_many([key(1), key(2)], [good, torch.zeros(BF16.shape, dtype=torch.float16)])
    with pytest.raises(ValueError):
        tier.put_many([key(1), key(2)], [good])
    assert len(tier) == 0 and tier.stats.puts == 0
    tier.put(key(1), good)
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
