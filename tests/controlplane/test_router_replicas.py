"""Router replicas: three real `kvweave router` processes over one Redis (registry and KV index) and
two real workers. For the same state they make the same decision (the same prompt goes to the
worker holding its prefix through each of them, as `route explain` and the responses show), and
each sees the others' in-flight requests (published through Redis, controlplane/replica_load.py)."""
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

    def indexed() -> bool:  # every replica reads the one index: once one sees the blocks, all do
        return all({c["worker_id"]: c for c in explain(url, prefix + [8])["candidates"]}[holder]["prefix_tokens"]
                   == {"device": 160} for _, url in routers)
    wait_until(indexed)

    # The same prompt, through each replica: the same decision, and the same worker serves it. The
    # costs differ by each replica's own churn memory (replica 0 placed the first request), which
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
