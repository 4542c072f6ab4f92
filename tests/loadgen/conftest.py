"""A cluster for the loadgen tests (tests/inprocess_cluster.py): two tiny-model workers and a router
serving gRPC and OpenAI HTTP, which the load generator, in-process or as a subprocess, reaches over
real sockets."""
from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.policies import DEFAULT_POLICY
from controlplane.router import RouterConfig
from tests.inprocess_cluster import InProcessCluster

ENGINE_CONFIG = {"dtype": "float32", "num_blocks": 256, "block_size": 16, "num_threads": 1,
                 "max_num_batched_tokens": 512, "dram_cache_gb": 0.02}


class LoadgenCluster(InProcessCluster):
    """Workers (`num_workers`) and one router (the default policy), started once the router can route
    to every worker; `grpc_target`, `http_url`, and `counters()` from the router's /metrics."""

    def start(self) -> "LoadgenCluster":
        super().start()
        self.router = self.add_router(policy=DEFAULT_POLICY, max_inflight=RouterConfig.max_inflight)
        deadline = time.monotonic() + 30
        while len(self.router.router.pool.eligible()) < self.num_workers:
            if time.monotonic() > deadline:
                raise TimeoutError("the router did not see both workers within 30 s")
            time.sleep(0.05)
        return self

    @property
    def grpc_target(self) -> str:
        return self.router.grpc_address

    @property
    def http_url(self) -> str:
        return self.router.http_url

    def counters(self) -> dict[str, float]:
        """The router's request and token counters: ok / invalid / ... requests, prompt and generation tokens,
        and routing decisions per worker ("decisions:<worker id>")."""
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "kvweave_router_requests_total":
                    out[sample.labels["status"]] = sample.value
                elif sample.name in ("kvweave_router_prompt_tokens_total", "kvweave_router_generation_tokens_total"):
                    out[sample.name.split("_")[2]] = sample.value
                elif sample.name == "kvweave_router_routing_decisions_total":
                    key = f"decisions:{sample.labels['worker']}"
                    out[key] = out.get(key, 0.0) + sample.value
        return out


@pytest.fixture(scope="module")
def cluster(redis_server, tiny_model_variant):
    c = LoadgenCluster(redis_server.url, tiny_model_variant("gqa"), lease_s=2.0, **ENGINE_CONFIG).start()
    yield c
    c.stop()
