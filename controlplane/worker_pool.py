"""The router's view of the workers: registry snapshot, one gRPC channel per worker, local load.

`WorkerPool.run` re-reads the registry every `refresh_s`; a worker whose lease expired drops out
(its channel is closed). Between heartbeats the registry's load figures are stale, so the pool
also counts what this router itself has placed on each worker and not yet finished, and what the
other router replicas have (published through Redis, controlplane/replica_load.py); a policy sees
the larger of the two views.

Circuit breaker: a worker that failed or stalled a call is opened (skipped by `eligible`) at once,
before its lease runs out; a probe asks its grpc.health.v1 service every `probe_s` and closes the
breaker when it answers SERVING, at least `min_open_s` after it opened (a worker that dies drops out
with its lease instead). Each transition is logged and reported to `on_breaker(opened, num_open)`.

Redis faults (docs/supervision.md): while the registry cannot be read the pool keeps its last view
(counted by `on_degraded("registry")`). When Redis answers again after a failure, or comes back
empty (`Registry.claim_epoch`), the workers re-register within a heartbeat; until then, for one
lease, a known worker missing from the listing is kept, so a Redis restart never empties the pool.
A worker that leaves outside that window has its channel closed at once: its calls in flight end,
and the router retries or migrates them (controlplane/forwarding.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
    """Requests this router sent here that have not streamed a token yet (an encode worker: the images
    of this router's Encode calls to it in flight)."""
    num_local_running: int = 0
    num_local_prefill_tokens: int = 0
    num_remote_waiting: int = 0
    """Requests the other router replicas sent here and not yet started (controlplane/replica_load.py)."""
    num_remote_running: int = 0
    num_remote_prefill_tokens: int = 0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def state(self, hit_tiers: bytes = b"") -> WorkerState:
        """`hit_tiers`: this worker's codes from `KVIndex.leading_tiers`."""
        load = self.info.load
        return WorkerState(
            self.info.worker_id,
            num_running=max(load.num_running, self.num_local_running + self.num_remote_running),
            num_waiting=max(load.num_waiting, self.num_local_waiting + self.num_remote_waiting),
            num_queued_prefill_tokens=max(load.num_queued_prefill_tokens,
                                          self.num_local_prefill_tokens + self.num_remote_prefill_tokens),
            num_kv_blocks_used=load.num_kv_blocks_used,
            num_kv_blocks_total=load.num_kv_blocks_total,
            num_hit_blocks=local_run(hit_tiers),
            hit_tiers=hit_tiers,
            kv_costs_ms=self.info.kv_costs_ms,
            block_size=self.info.block_size,
        )


class WorkerPool:
    def __init__(self, registry: Registry, model: str, refresh_s: float = 0.5, on_change=None,
                 on_degraded=None) -> None:
        """model: the model name workers must serve to be eligible; on_change(role -> count) is called
        after each refresh; on_degraded(reason) when the registry could not be read ("registry")."""
        self.registry = registry
        self.model = model
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.workers: dict[str, PoolWorker] = {}
        """Every live worker (any model or role), by id."""
        self.on_degraded = on_degraded
        self._opened: dict[str, float] = {}
        """Workers whose circuit breaker is open -> monotonic time it opened."""
        self._probes: dict[str, asyncio.Task] = {}
        self.probe_s = 0.5
        """How often an open breaker's worker is probed (its health service)."""
        self.min_open_s = 1.0
        """An open breaker stays open at least this long."""
        self.on_breaker = None
        """on_breaker(opened, num_open), called on each transition."""
        self._task: asyncio.Task | None = None
        self._closing = False
        self._num_refreshed = 0
        self._refresh_failed = False
        self._keep_missing_until = 0.0
        """Until then (after Redis came back), workers missing from the listing are kept."""
        self._leaving: set[asyncio.Task] = set()

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
        for task in self._probes.values():
            task.cancel()
        for w in self.workers.values():
            await w.channel.close()
        self.workers.clear()
        for task in list(self._leaving):
            task.cancel()
        if self._leaving:
            await asyncio.wait(self._leaving)

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # Redis down for a moment: keep the last view, try again
                if not self._refresh_failed:
                    logger.warning("registry refresh failed, routing over the %d known workers until Redis "
                                   "answers: %s", len(self.workers), e)
                self._refresh_failed = True
                if self.on_degraded is not None:
                    self.on_degraded("registry")

    async def refresh(self) -> None:
        lost_data = await self.registry.claim_epoch()
        infos = {info.worker_id: info for info in await self.registry.list_workers()}
        now = time.monotonic()
        if self._num_refreshed and (self._refresh_failed or lost_data):
            self._keep_missing_until = now + self.registry.lease_ms / 1000
            logger.warning("registry readable again%s: keeping the %d known workers for a lease while they "
                           "re-register", " (Redis lost its data)" if lost_data else "", len(self.workers))
        self._num_refreshed += 1
        self._refresh_failed = False
        for worker_id in list(self.workers):
            w = self.workers[worker_id]
            if worker_id not in infos and now < self._keep_missing_until:
                continue
            if worker_id not in infos or infos[worker_id].address != w.info.address:
                logger.info("worker %s at %s left", worker_id, w.info.address)
                del self.workers[worker_id]
                self._close_later(w.channel)
        for worker_id, info in infos.items():
            if worker_id in self.workers:
                self.workers[worker_id].info = info
            else:
                logger.info("worker %s joined at %s (model %s, role %s)", worker_id, info.address, info.model, info.role)
                channel = cluster_secret.insecure_channel(info.address, options=_CHANNEL_OPTIONS)  # with the credential
                self.workers[worker_id] = PoolWorker(info, channel, worker_pb2_grpc.WorkerStub(channel))
        if self.on_change is not None:
            self.on_change(dict(Counter(w.info.role for w in self.workers.values())))

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        """Close a left worker's channel without waiting here: the calls in flight on it end at once
        (a worker whose lease lapsed is dead or hung), and the router retries or migrates them."""
        task = asyncio.create_task(channel.close())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    def eligible(self, exclude: set[str] | frozenset[str] = frozenset(), roles: tuple[str, ...] = SERVING_ROLES
                 ) -> list[PoolWorker]:
        """Workers that serve the router's model in one of `roles` (default: those that serve a whole
        request), excluding `exclude` and those whose breaker is open."""
        return [w for w in self.workers.values()
                if w.info.model == self.model and w.info.role in roles and w.worker_id not in exclude
                and w.worker_id not in self._opened]

    def role_counts(self) -> dict[str, int]:
        """Live workers of the router's model per role, those with an open breaker left out."""
        return dict(Counter(w.info.role for w in self.eligible(roles=ROLES)))

    def is_open(self, worker_id: str) -> bool:
        return worker_id in self._opened

    def open_breaker(self, worker_id: str, why: str) -> None:
        """Stop sending to a worker that failed or stalled a call, until a probe finds it serving."""
        if worker_id in self._opened or worker_id not in self.workers:
            return
        self._opened[worker_id] = time.monotonic()
        logger.warning("worker %s: circuit breaker open (%s)", worker_id, why)
        self._probes[worker_id] = asyncio.create_task(self._probe(worker_id), name=f"kvweave-probe-{worker_id}")
        if self.on_breaker is not None:
            self.on_breaker(True, len(self._opened))

    def _close_breaker(self, worker_id: str, why: str) -> None:
        self._opened.pop(worker_id, None)
        self._probes.pop(worker_id, None)
        logger.info("worker %s: circuit breaker closed (%s)", worker_id, why)
        if self.on_breaker is not None:
            self.on_breaker(False, len(self._opened))

    async def _probe(self, worker_id: str) -> None:
        """Ask the worker's health service until it answers SERVING (then close) or it leaves."""
        opened = self._opened[worker_id]
        while True:
            await asyncio.sleep(self.probe_s)
            w = self.workers.get(worker_id)
            if w is None:
                return self._close_breaker(worker_id, "it left the registry")
            try:
                resp = await health_pb2_grpc.HealthStub(w.channel).Check(health_pb2.HealthCheckRequest(),
                                                                           timeout=max(self.probe_s, 0.5))
            except Exception as e:  # not answering, or its channel closed as it left: ask again
                logger.debug("worker %s: health probe failed: %s", worker_id, e)
                continue
            if resp.status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - opened >= self.min_open_s:
                return self._close_breaker(worker_id, "its health service answers SERVING")
