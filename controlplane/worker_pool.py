"""The router's view of the workers: registry snapshot, one gRPC channel per worker, local load.

`WorkerPool.run` re-reads the registry every `refresh_s`; a worker whose lease expired drops out
(its channel is closed). Between heartbeats the registry's load figures are stale, so the pool
also counts what this router itself has placed on each worker and not yet finished; a policy sees
the larger of the two views (the registry also reflects other routers' requests). A worker that
failed a call is quarantined for a lease, so requests stop trying it before its lease runs out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from controlplane.policies import WorkerState
from kvstore.index import local_run
from kvweave import cluster_secret
from kvweave.registry import ROLES, Registry, WorkerInfo
from kvweave.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

SERVING_ROLES = ("colocated", "decode")
"""Roles that can serve a whole request alone (a decode worker prefills what it is not handed off)."""
PREFILL_ROLES = ("prefill",)
"""Roles that prefill for decode workers (controlplane/disagg.py decides when)."""

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.enable_retries", 0)]


@dataclass(slots=True)
class PoolWorker:
    info: WorkerInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    num_local_waiting: int = 0
    """Requests this router sent here that have not streamed a token yet."""
    num_local_running: int = 0
    num_local_prefill_tokens: int = 0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def state(self, hit_tiers: bytes = b"") -> WorkerState:
        """`hit_tiers`: this worker's codes from `KVIndex.leading_tiers`."""
        load = self.info.load
        return WorkerState(
            self.info.worker_id,
            num_running=max(load.num_running, self.num_local_running),
            num_waiting=max(load.num_waiting, self.num_local_waiting),
            num_queued_prefill_tokens=max(load.num_queued_prefill_tokens, self.num_local_prefill_tokens),
            num_kv_blocks_used=load.num_kv_blocks_used,
            num_kv_blocks_total=load.num_kv_blocks_total,
            num_hit_blocks=local_run(hit_tiers),
            hit_tiers=hit_tiers,
            kv_costs_ms=self.info.kv_costs_ms,
            block_size=self.info.block_size,
        )


class WorkerPool:
    def __init__(self, registry: Registry, model: str, refresh_s: float = 0.5, on_change=None) -> None:
        """model: the model name workers must serve to be eligible; on_change(role -> count) is called
        after each refresh."""
        self.registry = registry
        self.model = model
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.workers: dict[str, PoolWorker] = {}
        """Every live worker (any model or role), by id."""
        self._quarantined: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="kvweave-worker-pool")

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True
            # The refresh loop may swallow one cancellation (redis-py's asyncio client can absorb
            # a CancelledError that lands inside a command): cancel until it has really ended.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        for w in self.workers.values():
            await w.channel.close()
        self.workers.clear()

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # Redis down for a moment: keep the last view, try again
                logger.warning("registry refresh failed: %s", e)

    async def refresh(self) -> None:
        infos = {info.worker_id: info for info in await self.registry.list_workers()}
        for worker_id in list(self.workers):
            w = self.workers[worker_id]
            if worker_id not in infos or infos[worker_id].address != w.info.address:
                logger.info("worker %s at %s left", worker_id, w.info.address)
                del self.workers[worker_id]
                await w.channel.close()
        for worker_id, info in infos.items():
            if worker_id in self.workers:
                self.workers[worker_id].info = info
            else:
                logger.info("worker %s joined at %s (model %s, role %s)", worker_id, info.address, info.model, info.role)
                channel = cluster_secret.insecure_channel(info.address, options=_CHANNEL_OPTIONS)  # with the credential
                self.workers[worker_id] = PoolWorker(info, channel, worker_pb2_grpc.WorkerStub(channel))
        if self.on_change is not None:
            self.on_change(dict(Counter(w.info.role for w in self.workers.values())))

    def eligible(self, exclude: set[str] | frozenset[str] = frozenset(), roles: tuple[str, ...] = SERVING_ROLES
                 ) -> list[PoolWorker]:
        """Workers that serve the router's model in one of `roles` (default: those that serve a whole
        request), excluding `exclude` and the quarantined."""
        now = time.monotonic()
        return [w for w in self.workers.values()
                if w.info.model == self.model and w.info.role in roles and w.worker_id not in exclude
                and self._quarantined.get(w.worker_id, 0.0) <= now]

    def role_counts(self) -> dict[str, int]:
        """Live, unquarantined workers of the router's model per role."""
        return dict(Counter(w.info.role for w in self.eligible(roles=ROLES)))

    def quarantine(self, worker_id: str, seconds: float) -> None:
        self._quarantined[worker_id] = time.monotonic() + seconds
        if len(self._quarantined) > 1024:  # forget long-expired entries
            now = time.monotonic()
            self._quarantined = {k: v for k, v in self._quarantined.items() if v > now}
