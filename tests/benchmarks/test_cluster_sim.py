"""The replays' cluster model: tiered LRU caches with demotion and promotion, chunk-caches reused at
any position, the index codes a policy sees, and hits counted at their tier's cost."""
from __future__ import annotations

import pytest

from benchmarks.cluster_sim import (
    TIER_WEIGHTS, ClusterModel, SimConfig, SimRequest, SimResult, TieredBlockCache, replay,
)
from controlplane.policies import make_policy
from kvstore.index import DEFAULT_COSTS_MS


def keys(*names: str) -> list[bytes]:
    return [n.encode() for n in names]


def test_tiers_demote_what_the_device_evicts_and_promote_a_hit():
    cache = TieredBlockCache((2, 2, 1))
    cache.insert(keys("a", "b"))  # b inserted first: a is the most recent
    cache.insert(keys("c"))
    assert [cache.tier_of(k) for k in keys("a", "b", "c")] == [0, 1, 0]
    cache.insert(keys("d", "e"))  # the device drops c then a to DRAM, DRAM's oldest (b) to SSD
    assert [cache.tier_of(k) for k in keys("a", "b", "c", "d", "e")] == [1, 2, 1, 0, 0]
    assert cache.leading_codes(keys("d", "a", "b", "x")) == b"123"
    cache.insert(keys("b"))  # promoted: out of the SSD, back on the device
    assert cache.tier_of(b"b") == 0 and len(cache) == 5
    cache.insert(keys("f", "g", "h"))  # the SSD holds one block: the rest falls off
    assert len(cache) == 5 and cache.leading_hits(keys("f", "g", "h")) == 3


def test_sim_config_sizes_host_tiers_from_the_device():
    cfg = SimConfig(capacity_blocks=100, dram_x=2, ssd_x=4.5)
    assert cfg.tiers == (("device", 100), ("dram", 200), ("ssd", 450))
    assert SimConfig(capacity_blocks=100).tiers == (("device", 100),)
    assert cfg.combined_blocks == 8 * 750 and SimConfig(capacity_blocks=100).combined_blocks == 800
    with pytest.raises(ValueError):
        SimConfig(dram_x=-1)


def test_a_chunk_is_reused_at_another_position_and_priced_by_its_tier():
    cfg = SimConfig(num_workers=2, capacity_blocks=8, block_size=4, dram_x=1.0, ms_per_token=0.0)
    model = ClusterModel(cfg)
    p1, p2 = keys("p1.0", "p1.1"), keys("p2.0")
    first = SimRequest(0.0, 20, 1, keys("A", "AB", "ABC", "ABCD", "ABCDE"), [(4, 8), (12, 4)], [p1, p2])
    model.place(0.0, 0, first, 20)
    # The same passages in the other order after the same 4-token instruction: one prefix block.
    second = SimRequest(1.0, 20, 1, keys("A", "AX", "AXY", "AXYZ", "AXYZW"), [(4, 4), (8, 8)], [p2, p1])
    found = model.outcomes(1000.0, second)
    assert found[0].codes == b"1" and found[0].chunk_codes == b"22"  # chunks live in DRAM
    assert found[1].codes == b"" and found[1].chunk_codes == b"--"
    states = model.states(found)
    assert (states[0].num_hit_blocks, states[0].hit_tiers, states[0].chunk_tiers) == (1, b"1", b"22")
    result = SimResult("x", 0, 0)
    uncached = model.credit(second, found[0], result)
    assert (result.hit_blocks, result.prefix_hit_tokens, result.chunk_tokens) == (1, 4, 12)
    assert result.weighted_chunk_tokens == pytest.approx(12 * TIER_WEIGHTS["dram"])
    assert uncached == round(20 - 4 - 12 * (1 - cfg.chunk_recompute_ratio))
    assert TIER_WEIGHTS["dram"] == pytest.approx(1 - DEFAULT_COSTS_MS["dram"] / DEFAULT_COSTS_MS["recompute"])


def test_chunk_aware_follows_the_chunks_where_prefix_aware_cannot_see_them():
    cfg = SimConfig(num_workers=4, capacity_blocks=64, block_size=4)
    passages = [keys(f"p{i}.0", f"p{i}.1") for i in range(3)]
    requests = []
    for t, order in enumerate([(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)]):
        chain = keys(*(f"r{t}.{b}" for b in range(7)))  # every prompt differs from its first block on
        spans = [(4 + 8 * k, 8) for k in range(3)]
        requests.append(SimRequest(float(t), 28, 1, chain, spans, [passages[i] for i in order]))
    chunky = replay(requests, cfg, "chunk_aware", policy=make_policy("chunk_aware"))
    blind = replay(requests, cfg, "prefix_aware", policy=make_policy("prefix_aware"))
    assert chunky.chunk_tokens == 3 * 24 and chunky.chunk_tokens_per_request == 18.0
    assert blind.chunk_tokens < chunky.chunk_tokens  # with no hits it spreads the requests
    assert chunky.reuse_rate == pytest.approx(72 / 112)
