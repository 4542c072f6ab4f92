"""Route explanations from the policy's own numbers (controlplane/explain.py), and router replicas'
shared in-flight load through a real Redis (controlplane/replica_load.py)."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from controlplane.explain import RoutePrediction, check_delivery, explain, predict, tokens_by_source
from controlplane.policies import ChunkAwarePolicy, RouteRequest, WorkerState
from controlplane.replica_load import ROUTERS_SET, ReplicaLoad, load_key
from controlplane.worker_pool import PoolWorker
from kvweave.registry import WorkerInfo, WorkerLoad


def states() -> list[WorkerState]:
    """a holds 2 blocks on the device and 2 in DRAM and the chunk in DRAM; b can fetch the 4 blocks
    from a (a peer) and holds nothing; c is nowhere in the index."""
    return [WorkerState("a", num_hit_blocks=4, hit_tiers=b"1122", chunk_tiers=b"2"),
            WorkerState("b", hit_tiers=b"0000", chunk_tiers=b"0"),
            WorkerState("c", hit_tiers=b"", chunk_tiers=b"-", num_running=3)]


REQUEST = RouteRequest(num_prompt_tokens=200, chunk_spans=[(100, 40)])


def test_tokens_by_source_reads_the_index_codes():
    a, b, c = states()
    assert tokens_by_source(REQUEST, a) == ({"device": 32, "dram": 32}, {"dram": 40})
    assert tokens_by_source(REQUEST, b) == ({"peer": 64}, {"peer": 40})
    assert tokens_by_source(REQUEST, c) == ({}, {})
    # Chunk tokens count from the end of the prefix run: a chunk inside it adds nothing.
    assert tokens_by_source(RouteRequest(200, chunk_spans=[(40, 40)]), a) == ({"device": 32, "dram": 32}, {"dram": 16})


def test_prediction_carries_the_policy_costs_and_the_runner_up():
    policy = ChunkAwarePolicy()
    workers = states()
    costs = {w.worker_id: ChunkAwarePolicy().cost(REQUEST, w) for w in workers}  # before the pick's churn
    decision = policy.pick(REQUEST, workers)
    assert decision.worker_id == "a" and decision.costs == costs
    p = predict(REQUEST, workers, decision)
    assert (p.worker_id, p.policy, p.reason, p.cost) == ("a", "chunk_aware", "cost", costs["a"])
    runner_up = min((cost, w) for w, cost in costs.items() if w != "a")
    assert (p.runner_up_cost, p.runner_up_id) == runner_up
    assert (p.held_tokens, p.peer_tokens) == (104, 0)

    e = explain(REQUEST, workers, decision)
    assert (e.num_prompt_tokens, e.num_chunks, e.chosen) == (200, 1, p)
    assert [(c.prediction.worker_id, c.prediction.cost, c.num_running) for c in e.candidates] == \
        [("a", costs["a"], 0), ("b", costs["b"], 0), ("c", costs["c"], 3)]
    assert e.candidates[1].prediction.prefix_tokens == {"peer": 64}


def test_unscored_decision_has_no_costs():
    decision = ChunkAwarePolicy(balance_abs_threshold=0).pick(REQUEST, states())  # load fallback
    assert decision.reason == "imbalance"
    p = predict(REQUEST, states(), decision)
    assert p.cost is None and p.runner_up_id == "" and p.runner_up_cost is None


@pytest.mark.parametrize("held, peer, delivered, expected", [
    ({"device": 64}, {}, 64, ""),
    ({"device": 64}, {}, 48, ""),          # the last block recomputed: within min_tokens
    ({"device": 512}, {}, 300, ""),        # within the ratio
    ({"device": 512}, {}, 200, "under"),   # the index promised more than the worker had: stale
    ({}, {}, 160, "over"),                 # the worker had KV the index never heard of
    ({}, {"peer": 160}, 160, ""),          # fetched from the peer the index named
    ({}, {"peer": 160}, 0, ""),            # a peer fetch not made is no divergence
    ({"device": 32}, {}, 200, "over"),
])
def test_check_delivery(held, peer, delivered, expected):
    p = RoutePrediction("a", "chunk_aware", "cost", prefix_tokens=held | peer)
    assert check_delivery(p, delivered, ratio=0.5, min_tokens=32) == expected


# ------------------------------------------------------------------------------ replica load

def pool_worker(worker_id: str, **counts) -> PoolWorker:
    return PoolWorker(WorkerInfo(worker_id, "127.0.0.1:1", "m", load=WorkerLoad(num_running=1)), None, None, **counts)


def test_replicas_see_each_others_in_flight_requests(redis_url):
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        a = ReplicaLoad(client, "router-a", sync_s=0.05, ttl_s=1.0)
        b = ReplicaLoad(client, "router-b", sync_s=0.05, ttl_s=1.0)
        c = ReplicaLoad(client, "router-c", sync_s=0.05, ttl_s=1.0)
        a_view = {"w0": pool_worker("w0", num_local_waiting=2, num_local_prefill_tokens=300),
                  "w1": pool_worker("w1", num_local_running=4)}
        b_view = {"w0": pool_worker("w0", num_local_running=3), "w1": pool_worker("w1")}
        c_view = {"w0": pool_worker("w0"), "w1": pool_worker("w1", num_local_running=1)}
        for replica, view in ((a, a_view), (b, b_view), (c, c_view)):
            await replica.sync(view)
        await a.sync(a_view)  # a reads b's and c's, published after its first sync
        assert [(w.num_remote_waiting, w.num_remote_running, w.num_remote_prefill_tokens)
                for w in c_view.values()] == [(2, 3, 300), (0, 4, 0)]
        assert [(w.num_remote_waiting, w.num_remote_running) for w in a_view.values()] == [(0, 3), (0, 1)]
        # The policy's view: the registry's heartbeat figure (1 running) or the routers' sum, the larger.
        s = c_view["w0"].state()
        assert (s.num_waiting, s.num_running, s.num_queued_prefill_tokens) == (2, 3, 300)
        assert c_view["w1"].state().num_running == 5  # c's own 1 + a's 4

        # A router that stops withdraws its entry; one that dies leaves it to expire.
        await b.close()
        await c.sync(c_view)
        assert c_view["w0"].num_remote_running == 0 and c_view["w0"].num_remote_waiting == 2
        a_view["w0"].num_local_waiting = 0  # a's requests started: published at its next sync
        await a.sync(a_view)
        await c.sync(c_view)
        assert c_view["w0"].num_remote_waiting == 0 and c_view["w1"].num_remote_running == 4
        await client.pexpire(load_key("router-a"), 1)
        await asyncio.sleep(0.05)
        await c.sync(c_view)
        assert c_view["w1"].num_remote_running == 0
        assert await client.smembers(ROUTERS_SET) == {b"router-c"}

        # Entries signed with another key (or none) are ignored when a key is set.
        signed = ReplicaLoad(client, "router-s", sync_s=0.05, ttl_s=1.0, key=b"k" * 32)
        await a.sync(a_view)
        await signed.sync({"w1": pool_worker("w1")})
        assert signed.num_rejected >= 1
        await client.aclose()

    asyncio.run(main())


def test_the_router_publishes_its_load_in_the_background(redis_url, tiny_hf_model):
    from controlplane.router import Router, RouterConfig

    async def main() -> None:
        router = Router(RouterConfig(redis_url=redis_url, model=str(tiny_hf_model), load_sync_s=0.05))
        await router.start()
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            for _ in range(100):  # the first sync runs as soon as the loop is free
                if await client.smembers(ROUTERS_SET):
                    break
                await asyncio.sleep(0.05)
            assert await client.smembers(ROUTERS_SET) == {router.replicas.router_id.encode()}
        finally:
            await router.stop()
        assert await client.smembers(ROUTERS_SET) == set()
        await client.aclose()

    asyncio.run(main())
