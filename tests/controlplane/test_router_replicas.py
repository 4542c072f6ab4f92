"""Router replicas: three real `kvweave router` processes over one Redis (registry and KV index) and
two real workers. For the same state they make the same decision (the same prompt goes to the
worker holding its prefix through each of them, as `route explain` and the responses show), and
each sees the others' in-flight requests (published through Redis, controlplane/replica_load.py).
Three in-process routers break ties on cold prompts alike, whatever order they list the workers in
and whatever they decided before."""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import redis

from controlplane.procs import stop_process
from controlplane.replica_load import ROUTERS_SET, load_key
from kvweave.v1 import inference_pb2_grpc
from tests.controlplane.test_auth import http
from tests.controlplane.test_router import generate, prompt_ids, token_prompt, wait_until


def start_router(cluster) -> tuple[subprocess.Popen, str, str]:
    """(process, gRPC address, HTTP URL) of a router process serving the cluster's model."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "router", "--port", "0", "--http-port", "0", "--redis-url", cluster.redis_url,
         "--model", str(cluster.model), "--policy", "chunk_aware", "--lease-s", "1.0", "--refresh-s", "0.1",
         "--load-sync-s", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("kvweave router ready: grpc "):
        stop_process(proc)
        pytest.fail(f"router did not start: {line or proc.stderr.read()}")
    words = line.split()
    return proc, words[4], words[6]


@pytest.fixture
def replicas(make_cluster):
    cluster = make_cluster(num_workers=2)
    procs: list[subprocess.Popen] = []
    try:
        routers = []
        for _ in range(3):
            proc, grpc_address, http_url = start_router(cluster)
            procs.append(proc)
            routers.append((grpc_address, http_url))
        for _, url in routers:
            wait_until(lambda url=url: http(f"{url}/health")[1]["workers"] == 2)
        yield cluster, routers
    finally:
        for proc in procs:
            stop_process(proc)


def explain(url: str, prompt) -> dict:
    status, body, _ = http(f"{url}/v1/route/explain", "POST", {"prompt": prompt})
    assert status == 200, body
    return body


def test_replicas_decide_alike_and_see_each_others_load(replicas):
    cluster, routers = replicas
    stubs = [inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address)) for address, _ in routers]
    prefix = prompt_ids(61, 160)  # 10 full blocks
    holder = generate(stubs[0], token_prompt(prefix + [7], max_tokens=1))[2].worker_id

    def settled() -> bool:
        """Every replica sees the blocks in the one index, and the same idle workers: until the
        workers' next heartbeats, one replica may still see the first request running where another
        does not, and price it."""
        views = []
        for _, url in routers:
            candidates = explain(url, prefix + [8])["candidates"]
            if {c["worker_id"]: c for c in candidates}[holder]["prefix_tokens"] != {"device": 160}:
                return False
            views.append(sorted((c["worker_id"], c["num_running"] + c["num_waiting"], c["num_queued_prefill_tokens"],
                                 c["kv_usage"]) for c in candidates))
        return all(v == views[0] for v in views) and all(busy == queued == 0 for _, busy, queued, _ in views[0])
    wait_until(settled)

    # The same prompt, through each replica: the same decision, and the same worker serves it. The
    # costs differ by each replica's own churn and traffic memory (replica 0 placed the first request), which
    # the router bench's hit_rate_replicas measures the effect of.
    decisions = [explain(url, prefix + [9])["chosen"] for _, url in routers]
    assert {d["worker_id"] for d in decisions} == {holder}
    assert {d["runner_up"]["worker_id"] for d in decisions} == {decisions[0]["runner_up"]["worker_id"]}
    assert decisions[1]["cost"] == decisions[2]["cost"]  # the two replicas that placed nothing yet agree exactly
    for i, stub in enumerate(stubs):
        last = generate(stub, token_prompt(prefix + prompt_ids(70 + i, 20), max_tokens=1))[2]
        assert last.worker_id == holder and last.usage.cached_tokens == 160
        assert last.usage.route.worker_id == holder and last.usage.route.divergence == ""

    # In-flight load: a long request through replica 0 is in the load replicas 1 and 2 see.
    long_stream = stubs[0].Generate(token_prompt(prompt_ids(80, 20), max_tokens=2000, request_id="long-replica"),
                                    timeout=120)
    busy = next(long_stream).worker_id
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        def published() -> bool:  # replica 0's own entry in Redis names the worker
            entries = [json.loads(v) for v in client.mget([load_key(i.decode()) for i in client.smembers(ROUTERS_SET)])
                       if v is not None]
            return len(entries) == 3 and sum(e.get(busy, [0, 0, 0])[1] for e in entries) == 1
        wait_until(published)

        def seen(url: str) -> bool:
            c = {c["worker_id"]: c for c in explain(url, prompt_ids(81, 20))["candidates"]}[busy]
            return c["num_running"] + c["num_waiting"] >= 1
        for _, url in routers[1:]:
            wait_until(lambda url=url: seen(url))
    finally:
        long_stream.cancel()
        client.close()
    wait_until(lambda: cluster.num_worker_requests() == 0)


async def _cold_decisions(redis_url: str, model) -> None:
    import random
    import time

    from controlplane.router import Router, RouterConfig
    from controlplane.router_types import GenerateInput
    from kvweave.model_files import load_tokenizer
    from kvweave.registry import Registry, WorkerInfo
    from kvweave.sampling_params import SamplingParams
    from worker.engine import EngineConfig
    from worker.server import WorkerOptions, WorkerServer

    worker = WorkerServer(EngineConfig(model=str(model), dtype="float32", num_blocks=64, num_threads=1),
                          WorkerOptions())  # no Redis: its registry entries are ours
    await worker.start()
    tokenizer = load_tokenizer(str(model))
    # The churn and traffic memories are each replica's own (what it placed itself): off, so that only
    # the tie-break decides among workers that hold nothing of these prompts and carry the same load.
    routers = [Router(RouterConfig(redis_url=redis_url, model=str(model),
                                   policy_config={"churn_weight": 0.0, "traffic_weight": 0.0}),
                      tokenizer) for _ in range(3)]
    try:
        registry = Registry(routers[0].redis, lease_s=3600)
        for w in ("w0", "w1", "w2", "w3"):
            await registry.heartbeat(WorkerInfo(w, worker.address, routers[0].model.name, max_model_len=512))
        for i, router in enumerate(routers):
            await router.start()
            # Replicas list the workers in the order they found them: a different one each here.
            order = list(router.pool.workers.items())
            random.Random(i).shuffle(order)
            router.pool.workers = dict(order)

        async def decide(router: Router, prompt: list[int]) -> str:
            params = SamplingParams(max_tokens=1, temperature=0.0)
            req = router._prepare(GenerateInput(prompt=prompt, params=params), time.perf_counter())
            workers = router._candidates(req)
            return router._pick(req, workers, await router._lookup(req, workers))[0].worker_id

        prompts = [prompt_ids(200 + k, 40) for k in range(12)]  # cold: nobody holds any of their blocks
        orders = [list(range(12)), list(reversed(range(12))), random.Random(7).sample(range(12), 12)]
        chosen = []
        for router, order in zip(routers, orders):  # each replica after its own history of decisions
            chosen.append({k: await decide(router, prompts[k]) for k in order})
        assert chosen[0] == chosen[1] == chosen[2]
        assert len(set(chosen[0].values())) > 1  # the tie-break spreads unrelated prompts
    finally:
        for router in routers:
            await router.stop()
        await worker.stop()


def test_replicas_break_ties_alike_on_cold_prompts(redis_url, tiny_hf_model):
    """Three routers over one Redis, each listing the workers in another order and deciding the
    prompts in another order, place every cold prompt on the same worker."""
    import asyncio

    asyncio.run(_cold_decisions(redis_url, tiny_hf_model))
