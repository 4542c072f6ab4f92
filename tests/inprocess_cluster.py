"""A cluster in this process for tests: real Redis (a database of its own), real gRPC workers on a
tiny model, real routers (gRPC and OpenAI HTTP).

Everything asynchronous (workers, routers) runs in one event loop in a background thread, so tests
can use blocking clients (the official `openai` client, sync gRPC stubs, the load generator) from
the test thread. Used by tests/controlplane and tests/loadgen.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from pathlib import Path

import redis

from controlplane.router import Router, RouterConfig
from controlplane.router_main import RouterServer, ServeOptions
from worker.engine import EngineConfig
from kvweave.model_files import load_tokenizer
from worker.server import WorkerOptions, WorkerServer

logger = logging.getLogger(__name__)

_DB = itertools.count(1)  # each cluster gets its own Redis database
# A worker whose heartbeats (every 0.2 s, from the loop it shares with every other worker and router
# here) stop for this long leaves the registry. Long enough that a loaded 2-core CI machine stalling
# this process for a second does not drop a healthy worker; tests that crash workers and wait for the
# lease to run out give a shorter one (`make_cluster`).
LEASE_S = 3.0


def pin_kv_costs(server: RouterServer, monkeypatch, costs) -> None:
    """From now on every registry refresh of `server`'s pool gives each worker `costs(worker_id)`
    (ms per token by source, as a worker measures them), whatever the workers publish: the tiny test
    model recomputes so fast that its measured costs would not be a real model's. Returns once a
    patched refresh has run (a refresh already in flight would still put the published costs back;
    refreshes run one after another, so every later one is the patched one)."""
    pool = server.router.pool
    real_refresh = pool.refresh
    ran = threading.Event()

    async def refresh():
        await real_refresh()
        for w in pool.workers.values():
            w.info.kv_costs_ms = {**(w.info.kv_costs_ms or {}), **costs(w.worker_id)}
        ran.set()

    monkeypatch.setattr(pool, "refresh", refresh)
    assert ran.wait(timeout=10 * server.router.config.refresh_s + 5), "no registry refresh ran"


class InProcessCluster:
    def __init__(self, redis_base_url: str, model: Path, num_workers: int = 2, lease_s: float = LEASE_S,
                 **engine_config) -> None:
        self.redis_url = redis_base_url.rsplit("/", 1)[0] + f"/{next(_DB) % 16}"
        redis.Redis.from_url(self.redis_url).flushdb()
        self.model = model
        self.engine_config = {"dtype": "float32", "num_blocks": 256, "block_size": 16, "num_threads": 1,
                              "max_num_batched_tokens": 256} | engine_config
        self.num_workers = num_workers
        self.lease_s = lease_s
        self.workers: list[WorkerServer] = []
        self.routers: list[RouterServer] = []
        self.tokenizer = load_tokenizer(str(model))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-cluster", daemon=True)

    def run(self, coro, timeout: float = 120.0):
        """Run `coro` in the cluster's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "InProcessCluster":
        self._thread.start()
        for i in range(self.num_workers):
            self.add_worker(f"w{i}")
        return self

    def add_worker(self, worker_id: str, role: str = "colocated", kv_transport: str = "auto", peer_fetch: bool = True,
                   **engine_config) -> WorkerServer:
        options = WorkerOptions(redis_url=self.redis_url, worker_id=worker_id, lease_s=self.lease_s, heartbeat_s=0.2,
                                grace_s=0.5, role=role, kv_transport=kv_transport, peer_fetch=peer_fetch)
        server = WorkerServer(EngineConfig(model=str(self.model), **(self.engine_config | engine_config)), options)
        self.run(server.start())
        self.workers.append(server)
        return server

    def add_router(self, policy: str = "prefix_aware", max_inflight: int = 64, router_config: dict | None = None,
                   serve_options: dict | None = None, **policy_config) -> RouterServer:
        """`router_config`: other RouterConfig fields (e.g. the disaggregation settings); `serve_options`:
        ServeOptions fields (e.g. API keys, TLS)."""
        config = RouterConfig(redis_url=self.redis_url, model=str(self.model), policy=policy,
                              policy_config=policy_config, max_inflight=max_inflight, lease_s=self.lease_s,
                              refresh_s=0.1, **(router_config or {}))
        server = RouterServer(config, ServeOptions(grace_s=0.5, **(serve_options or {})), Router(config, self.tokenizer))
        self.run(server.start())
        self.routers.append(server)
        return server

    def kill_worker(self, worker: WorkerServer) -> None:
        """Stop serving at once, as a crash would: no deregistration, the lease runs out on its own."""
        async def crash() -> None:
            for task in worker._tasks:
                task.cancel()
            await worker._server.stop(None)
        self.run(crash())

    def num_worker_requests(self) -> int:
        """Requests the workers' engines still hold."""
        return sum(w.engine.num_requests for w in self.workers if w.engine is not None)

    def stop(self) -> None:
        for server in [*self.routers, *self.workers]:
            try:
                self.run(server.stop(), timeout=30)
            except Exception:  # keep stopping the rest; the failure is in the log
                logger.exception("stopping %r failed", server)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()
