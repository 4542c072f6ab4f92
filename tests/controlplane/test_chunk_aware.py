"""chunk_aware: the policy on hand-built worker states (exact costs), and the real router placing a
request with reusable chunks on the worker whose KV-index entries hold them (real Redis, a real
gRPC worker on the tiny model)."""
from __future__ import annotations

import asyncio
import random

import pytest

from controlplane.policies import (
    DEFAULT_CHURN_WEIGHT, DEFAULT_DECODE_WEIGHT, DEFAULT_KV_COSTS_MS, DEFAULT_POLICY, DEFAULT_PREFILL_WEIGHT, ChunkAwarePolicy, PolicyError, PrefixAwarePolicy, RouteRequest, WorkerState,
    chunk_prefill_work, held_chunk_tokens, make_policy,
)

DRAM, SSD, PEER = DEFAULT_KV_COSTS_MS["dram"], DEFAULT_KV_COSTS_MS["ssd"], DEFAULT_KV_COSTS_MS["peer"]
PW, CW = DEFAULT_PREFILL_WEIGHT, DEFAULT_CHURN_WEIGHT
# A 400-token prompt with one 256-token chunk after a 32-token preamble.
CHUNKED = RouteRequest(400, chunk_spans=[(32, 256)])


def workers(*specs: dict) -> list[WorkerState]:
    return [WorkerState(worker_id=f"w{i}", **spec) for i, spec in enumerate(specs)]


def test_chunk_aware_is_the_default():
    from controlplane.router import RouterConfig

    assert DEFAULT_POLICY == "chunk_aware" == RouterConfig().policy
    assert isinstance(make_policy("chunk_aware"), ChunkAwarePolicy)
    assert make_policy("chunk_aware").needs_index
    assert isinstance(make_policy("session").fallback, ChunkAwarePolicy)


def test_prefers_the_worker_holding_the_chunk():
    # No prefix shared: w0 holds the chunk in DRAM, w1 could fetch it from w0, w2 does not count it.
    decision = make_policy("chunk_aware").pick(CHUNKED, workers({"chunk_tiers": b"2"}, {"chunk_tiers": b"0"}, {}))
    assert (decision.worker_id, decision.reason, decision.policy) == ("w0", "cost", "chunk_aware")
    assert decision.costs == pytest.approx({
        # its tier's cost + 8% recomputed (the workers' default); it stores only the 144 other tokens
        "w0": PW * (400 - 256 * (1 - DRAM - 0.08)) + CW * 144,
        "w1": PW * (400 - 256 * (1 - PEER - 0.08)) + CW * 400,  # the transfer instead of the load
        "w2": (PW + CW) * 400.0,
    })
    # prefix_aware sees no difference between them.
    assert set(make_policy("prefix_aware").pick(CHUNKED, workers({"chunk_tiers": b"2"}, {})).costs.values()) == {(PW + CW) * 400}


def test_prefers_the_cheaper_tier():
    states = workers({"chunk_tiers": b"3"}, {"chunk_tiers": b"2"})
    assert make_policy("chunk_aware").pick(CHUNKED, states).worker_id == "w1"
    # A worker's own measurements replace the defaults: a slow disk loses to fetching from it.
    slow_disk = WorkerState("slow", chunk_tiers=b"3", kv_costs_ms={"ssd": 2.0, "recompute": 1.0})
    fetcher = WorkerState("fetch", chunk_tiers=b"0", kv_costs_ms={"peer": 0.5, "recompute": 1.0})
    assert chunk_prefill_work(CHUNKED, slow_disk, 0.15) == pytest.approx(400 + 256 * 1.15)
    assert chunk_prefill_work(CHUNKED, fetcher, 0.15) == pytest.approx(400 - 256 * 0.35)
    assert make_policy("chunk_aware").pick(CHUNKED, [slow_disk, fetcher]).worker_id == "fetch"


def test_counts_each_chunk_beyond_the_prefix_run():
    request = RouteRequest(400, chunk_spans=[(16, 64), (96, 128), (240, 100)])
    # w0: 10 leading blocks (160 tokens) on its device; chunk 0 lies inside them, chunk 1 half beyond.
    w0 = WorkerState("w0", num_hit_blocks=10, hit_tiers=b"1" * 10, chunk_tiers=b"230")
    assert chunk_prefill_work(request, w0, 0.15) == pytest.approx(
        240 - 64 * (1 - SSD - 0.15) - 100 * (1 - PEER - 0.15))
    # w1 would fetch those 10 blocks from w0 (the same run, at the peer cost); only it holds chunk 2.
    w1 = WorkerState("w1", hit_tiers=b"0" * 10, chunk_tiers=b"0-2")
    assert chunk_prefill_work(request, w1, 0.15) == pytest.approx(240 + 160 * PEER - 100 * (1 - DRAM - 0.15))
    assert make_policy("chunk_aware").pick(request, [w0, w1]).worker_id == "w0"
    # Chunk tokens a worker holds itself beyond its own prefix hit (the router's predicted chunk hits).
    assert held_chunk_tokens(request, w0) == 64
    assert held_chunk_tokens(request, w1) == 100


def test_recompute_ratio_is_an_option():
    states = workers({"chunk_tiers": b"2"}, {"chunk_tiers": b"0"})
    costs = make_policy("chunk_aware", recompute_ratio=0.5).pick(CHUNKED, states).costs
    assert costs["w0"] == pytest.approx(PW * (400 - 256 * (0.5 - DRAM)) + CW * 144)
    with pytest.raises(PolicyError, match="recompute_ratio"):
        make_policy("chunk_aware", recompute_ratio=1.5)
    with pytest.raises(PolicyError, match="chunk_aware"):
        make_policy("chunk_aware", recompute_ration=0.1)


def test_respects_load_as_prefix_aware_does():
    policy = ChunkAwarePolicy(balance_abs_threshold=8, balance_rel_threshold=1.5)
    held = {"chunk_tiers": b"2"}
    # 20 vs 2 requests: both thresholds exceeded -> least loaded, whatever the chunks say.
    decision = policy.pick(CHUNKED, workers({"num_running": 20, **held}, {"num_running": 2, "chunk_tiers": b"-"}))
    assert (decision.worker_id, decision.reason) == ("w1", "imbalance")
    # A running request more on the holder (within the thresholds): still the holder.
    assert PW * 400 - PW * 256 * (1 - DRAM - 0.08) + CW * 144 + DEFAULT_DECODE_WEIGHT < (PW + CW) * 400
    states = workers({"num_running": 1, **held}, {"chunk_tiers": b"-"})
    assert policy.pick(CHUNKED, states).worker_id == "w0"
    # A prefill queue on the holder longer than what the chunk saves outweighs it.
    states = workers({"num_queued_prefill_tokens": PW * 256 + 1000, **held}, {"chunk_tiers": b"-"})
    assert policy.pick(CHUNKED, states).worker_id == "w1"


def _random_states(rng: random.Random, n: int, chunk_tiers: bool) -> list[WorkerState]:
    run = rng.randrange(0, 12)
    out = []
    for i in range(n):
        own = rng.randrange(0, run + 1)
        codes = bytes(rng.choice(b"123") for _ in range(own)) + b"0" * (run - own)
        out.append(WorkerState(
            f"w{i}", num_running=rng.randrange(0, 40), num_waiting=rng.randrange(0, 4),
            num_queued_prefill_tokens=rng.choice((0, 0, 100, 3000)), num_kv_blocks_used=rng.randrange(0, 100),
            num_kv_blocks_total=100, num_hit_blocks=own, hit_tiers=codes if run else b"",
            kv_costs_ms=rng.choice((None, {"dram": 0.01, "ssd": 0.3, "peer": 0.05, "recompute": 0.8})),
            chunk_tiers=b"-" * 3 if chunk_tiers else b""))
    return out


@pytest.mark.parametrize("spans", [(), [(16, 40), (60, 30), (100, 50)]])
def test_without_usable_chunks_decides_exactly_as_prefix_aware(spans):
    """No chunks (or chunks nobody holds): the same workers, reasons and costs, pick after pick."""
    rng = random.Random(7)
    chunk_aware, prefix_aware = make_policy("chunk_aware"), PrefixAwarePolicy()
    for _ in range(300):
        states = _random_states(rng, rng.randrange(1, 5), chunk_tiers=bool(spans))
        request = RouteRequest(rng.randrange(160, 400), chunk_spans=spans)
        a, b = chunk_aware.pick(request, states), prefix_aware.pick(request, states)
        assert (a.worker_id, a.reason, a.costs) == (b.worker_id, b.reason, b.costs)


# -------------------------------------------------------------------------------- the real router

DOC = ("Retrieved documents, system prompts and tool outputs recur across requests. " * 6).strip()


async def _route(redis_url: str, model) -> None:
    from kvweave.registry import Registry, WorkerInfo, WorkerLoad
    from controlplane.router import Router, RouterConfig
    from controlplane.router_types import GenerateInput
    from kvstore.keys import chunk_block_keys, chunk_hash
    from kvstore.index import KVIndex
    from kvstore.keys import encode_extra_keys, hash_blocks
    from controlplane.policies import RouteRequest, tie_rank
    from worker.engine import EngineConfig
    from kvweave.model_files import load_tokenizer
    from kvweave.sampling_params import SamplingParams
    from worker.server import WorkerOptions, WorkerServer

    worker = WorkerServer(EngineConfig(model=str(model), dtype="float32", num_blocks=256, block_size=16,
                                       num_threads=1), WorkerOptions())  # no Redis: its registry entries are ours
    await worker.start()
    # The index here never learns of the routed requests' own blocks, so repeated routes would
    # count the same prompt as new work each time, and the small chunk alone would not outweigh the
    # requests already sent to its holder: the churn and traffic terms are off (test_policies.py tests them).
    router = Router(RouterConfig(redis_url=redis_url, model=str(model), refresh_s=0.1,
                                 policy_config={"churn_weight": 0.0, "traffic_weight": 0.0}),
                    load_tokenizer(str(model)))
    try:
        # Three workers at that one address, all with DRAM and SSD tiers holding something.
        registry = Registry(router.redis, lease_s=3600)
        for w in ("w0", "w1", "w2"):
            await registry.heartbeat(WorkerInfo(w, worker.address, router.model.name, max_model_len=512,
                                                load=WorkerLoad(kv_entries={"device": 1, "dram": 5, "ssd": 5})))
        await router.start()
        assert router.policy.name == "chunk_aware"
        segments = [("Answer from the document below.", False), (DOC, True), ("Question: what recurs?", False)]
        token_ids, spans = router.encode_prompt(GenerateInput(segments=segments))
        (start, n), = spans
        key = chunk_hash(token_ids[start:start + n], encode_extra_keys((router.model.name, "")))
        entries = chunk_block_keys(key, n, 16)
        index = KVIndex(router.redis, lease_s=3600)

        async def route() -> str:
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            deltas = [d async for d in router.generate(GenerateInput(segments=segments, params=params))]
            assert deltas[-1].finished and deltas[-1].usage.prompt_tokens == len(token_ids)
            return deltas[-1].worker_id

        await index.replace("w1", "dram", entries)
        assert [await route() for _ in range(3)] == ["w1"] * 3
        metric = router.metrics.predicted_chunk_hit_tokens._value.get()
        assert metric == 3 * n
        # w1 loses an entry, w2 holds the whole chunk on SSD: w2 now.
        await index.replace("w1", "dram", entries[1:])
        await index.replace("w2", "ssd", entries)
        assert [await route() for _ in range(3)] == ["w2"] * 3
        # ... unless its heartbeat says its SSD holds nothing (that tier is not asked): a tie again,
        # which the prompt's first block breaks, alike on every route (and on every router replica).
        await registry.heartbeat(WorkerInfo("w2", worker.address, router.model.name, max_model_len=512,
                                            load=WorkerLoad(kv_entries={"device": 1})))
        await router.pool.refresh()
        first = RouteRequest(len(token_ids), hash_blocks(token_ids, 16, encode_extra_keys((router.model.name, ""))))
        assert [await route() for _ in range(3)] == [min(("w0", "w1", "w2"), key=lambda w: tie_rank(first, w))] * 3
    finally:
        await router.stop()
        await worker.stop()


def test_router_places_chunks_on_their_holder(redis_url, tiny_hf_model):
    asyncio.run(_route(redis_url, tiny_hf_model))
