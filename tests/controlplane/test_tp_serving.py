"""A tensor-parallel worker (two rank processes) in a real cluster: it serves through the router
with prefix caching, chunk reuse and the DRAM tier working, its blocks are fetched by a one-rank
worker (a TP group's cache holds every head of a block, laid out as one rank's: any worker of the
model can use it), its outputs equal one engine's; and when one of its ranks dies, the worker
deregisters and its requests are retried on the other worker."""
from __future__ import annotations

import time

import pytest

from controlplane.router_types import GenerateInput
from kvstore.index import KVIndex
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave.sampling_params import SamplingParams
from tests.inprocess_cluster import InProcessCluster

ENGINE = {"dtype": "float32", "block_size": 16, "num_threads": 1, "max_num_batched_tokens": 256}
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _prompt(n: int, salt: int) -> list[int]:
    return [(i * 31 + salt * 17) % 230 + 7 for i in range(n)]


def _generate(cluster: InProcessCluster, inp: GenerateInput):
    async def run():
        return [d async for d in cluster.routers[0].router.generate(inp)]
    deltas = cluster.run(run())
    return [t for d in deltas for t in d.token_ids], deltas[-1]


@pytest.fixture(scope="module")
def reference(tiny_model_variant):
    from worker.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model_variant("gqa")), num_blocks=256, **ENGINE))
    return lambda prompt: engine.generate([prompt], GREEDY)[0].token_ids


@pytest.fixture
def tp_cluster(redis_server, tiny_model_variant):
    c = InProcessCluster(redis_server.url, tiny_model_variant("gqa"), num_workers=0, **ENGINE)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _wait(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_tp_worker_serves_with_prefix_chunk_and_tier_reuse(tp_cluster, reference):
    c = tp_cluster
    tp = c.add_worker("w-tp", tensor_parallel_size=2, num_blocks=40, dram_cache_gb=0.05)
    c.add_router("prefix_aware")
    prefix = _prompt(160, 1)  # 10 full blocks
    first = prefix + _prompt(9, 2)
    tokens, last = _generate(c, GenerateInput(prompt=first, params=GREEDY))
    assert tokens == reference(first) and last.worker_id == "w-tp"
    tokens, last = _generate(c, GenerateInput(prompt=prefix + _prompt(5, 3), params=GREEDY))
    assert tokens == reference(prefix + _prompt(5, 3)) and last.usage.cached_tokens == 160
    # Chunks: two passages in one order, then the other; the second reuses both chunk-caches.
    passages = [" ".join(f"fact{k}-{i}" for i in range(12)) for k in range(2)]
    for order in ((0, 1), (1, 0)):
        segs = [("Context:", False), (passages[order[0]], True), (passages[order[1]], True), ("Q?", False)]
        _, last = _generate(c, GenerateInput(segments=segs, params=GREEDY))
    assert last.usage.chunk_reused_tokens > 0
    # Tiers: unrelated prompts push the prefix's blocks out of the 40-block device cache into DRAM.
    for salt in range(10, 16):
        _generate(c, GenerateInput(prompt=_prompt(150, salt), params=GREEDY))
    hits = tp.engine.engine.scheduler.connector.stats.hit_tokens
    from_dram = hits["dram"]
    again = prefix + _prompt(7, 4)
    tokens, last = _generate(c, GenerateInput(prompt=again, params=GREEDY))
    assert tokens == reference(again) and last.usage.cached_tokens >= 160
    assert hits["dram"] - from_dram >= 160  # loaded back from the DRAM tier into both ranks' heads


def test_a_one_rank_worker_fetches_a_tp_workers_blocks(tp_cluster, reference):
    c = tp_cluster
    tp = c.add_worker("w-tp", tensor_parallel_size=2, num_blocks=64)
    c.add_router("prefix_aware")
    prefix = _prompt(160, 5)
    _generate(c, GenerateInput(prompt=prefix + [9], params=GREEDY))
    one = c.add_worker("w-one", num_blocks=64)
    # Straight to the one-rank worker's engine through its prefetcher (the router would pick w-tp).
    want = prefix + _prompt(6, 6)

    async def on_one():
        return [o async for o in one.engine.generate(want, GREEDY)]
    _wait(lambda: "w-tp" in one._peers, "w-one knows its peer")
    hashes = hash_blocks(prefix, 16, encode_extra_keys((tp.engine.engine.model_name, "")))
    index = KVIndex(c.routers[0].router.redis)
    _wait(lambda: all(c.run(index.lookup(hashes, ["w-tp"]))[("w-tp", "device")]), "w-tp's blocks indexed")
    outs = c.run(on_one())
    assert [t for o in outs for t in o.new_token_ids] == reference(want)
    assert one.prefetcher.stats.peer_blocks >= 10  # fetched from w-tp, not recomputed


def test_a_dead_rank_takes_the_worker_out_and_requests_go_elsewhere(tp_cluster, reference):
    c = tp_cluster
    tp = c.add_worker("w-tp", tensor_parallel_size=2, num_blocks=64)
    c.add_worker("w-one", num_blocks=64)
    c.add_router("round_robin")
    _wait(lambda: len(c.routers[0].router.pool.workers) == 2, "both workers registered")
    rank1 = tp.engine.engine.tp.procs[0]
    rank1.kill()
    rank1.wait()
    for i in range(4):
        prompt = _prompt(40, 20 + i)
        tokens, last = _generate(c, GenerateInput(prompt=prompt, params=GREEDY))
        assert tokens == reference(prompt) and last.worker_id == "w-one"
    assert tp.failed.is_set() and "rank 1" in tp.failure
    _wait(lambda: list(c.routers[0].router.pool.workers) == ["w-one"], "the TP worker deregistered")
