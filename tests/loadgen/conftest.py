"""A local cluster for loadgen tests: real Redis, two real gRPC workers on the tiny model, and a real
router serving both gRPC and OpenAI HTTP, all in one event loop in a background thread (so the
load generator, run in-process or as a subprocess, talks to them over real sockets)."""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from controlplane.router import Router, RouterConfig
from controlplane.router_main import RouterServer, ServeOptions
from worker.engine import EngineConfig
from worker.loader import load_tokenizer
from worker.server import WorkerOptions, WorkerServer

LOADGEN_DB = 14
"""Redis database of this module's cluster (other test modules use low numbers)."""
ENGINE_CONFIG = {"dtype": "float32", "num_blocks": 256, "block_size": 16, "num_threads": 1,
                 "max_num_batched_tokens": 512, "dram_cache_gb": 0.02}


class LoadgenCluster:
    """Two workers and one router; `grpc_target`, `http_url`, and `counters()` from the router's /metrics."""

    def __init__(self, redis_base_url: str, model: Path, num_workers: int = 2) -> None:
        self.redis_url = redis_base_url.rsplit("/", 1)[0] + f"/{LOADGEN_DB}"
        redis.Redis.from_url(self.redis_url).flushdb()
        self.model, self.num_workers = model, num_workers
        self.servers: list = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loadgen-cluster", daemon=True)

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "LoadgenCluster":
        self._thread.start()
        for i in range(self.num_workers):
            options = WorkerOptions(redis_url=self.redis_url, worker_id=f"w{i}", lease_s=2.0, heartbeat_s=0.2,
                                    grace_s=0.5)
            self._serve(WorkerServer(EngineConfig(model=str(self.model), **ENGINE_CONFIG), options))
        config = RouterConfig(redis_url=self.redis_url, model=str(self.model), lease_s=2.0, refresh_s=0.1)
        self.router = self._serve(RouterServer(config, ServeOptions(grace_s=0.5),
                                               Router(config, load_tokenizer(str(self.model)))))
        deadline = time.monotonic() + 30
        while len(self.router.router.pool.eligible()) < self.num_workers:
            if time.monotonic() > deadline:
                raise TimeoutError("the router did not see both workers within 30 s")
            time.sleep(0.05)
        return self

    def _serve(self, server):
        self.run(server.start())
        self.servers.append(server)
        return server

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

    def stop(self) -> None:
        for server in reversed(self.servers):
            self.run(server.stop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def cluster(redis_server, tiny_model_variant):
    c = LoadgenCluster(redis_server.url, tiny_model_variant("gqa")).start()
    yield c
    c.stop()
