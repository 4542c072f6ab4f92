"""The router's readiness, as a Kubernetes probe sees it: GET /ready and the gRPC health of the empty
service name follow whether a worker serves the router's model, on a real router with real workers
(tiny model) and a real Redis; liveness (GET /health, the health of kvweave.v1.Inference) does not."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.grpc_frontend import SERVICE_NAME

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MODEL = "tiny-gqa"


def get(router, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(router.http_url + path, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def grpc_health(router, service: str = "") -> int:
    with grpc.insecure_channel(router.grpc_address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=30).status


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    """Poll until `condition()` holds (the router re-reads the registry every 0.1 s here)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {timeout_s:g} s")
        time.sleep(0.05)


def assert_not_ready(router, roles: dict[str, int]) -> None:
    status, body = get(router, "/ready")
    assert status == 503
    assert body["error"]["code"] == "no_worker" and body["error"]["type"] == "service_unavailable"
    assert f"no worker serves model '{MODEL}'" in body["error"]["message"]
    assert get(router, "/health") == (200, {"status": "ok", "workers": sum(roles.values()), "roles": roles,
                                            "requests_in_flight": 0})
    assert grpc_health(router) == NOT_SERVING
    assert grpc_health(router, SERVICE_NAME) == SERVING  # alive: a liveness probe must not restart it


def test_ready_follows_the_workers_of_the_model(make_cluster):
    c = make_cluster(num_workers=0)
    router = c.add_router()
    assert_not_ready(router, {})

    c.add_worker("p0", role="prefill")  # a prefill worker cannot serve a request alone
    wait_for(lambda: get(router, "/health")[1]["workers"] == 1, "seeing the prefill worker")
    assert_not_ready(router, {"prefill": 1})

    worker = c.add_worker("w0")
    wait_for(lambda: get(router, "/ready")[0] == 200, "ready")
    assert get(router, "/ready") == (200, {"status": "ready", "models": [{"id": MODEL, "num_workers": 1}],
                                           "workers": 2, "roles": {"prefill": 1, "colocated": 1}})
    wait_for(lambda: grpc_health(router) == SERVING, "SERVING on gRPC")

    c.run(worker.stop())  # deregisters: the router sees it leave at its next refresh
    c.workers.remove(worker)
    wait_for(lambda: get(router, "/ready")[0] == 503, "unready again")
    wait_for(lambda: grpc_health(router) == NOT_SERVING, "NOT_SERVING on gRPC")
    assert_not_ready(router, {"prefill": 1})


def test_a_router_with_workers_is_ready_from_its_start(cluster):
    router = cluster.add_router()
    status, body = get(router, "/ready")
    assert status == 200 and body["models"] == [{"id": MODEL, "num_workers": 2}]
    assert grpc_health(router) == SERVING and grpc_health(router, SERVICE_NAME) == SERVING
