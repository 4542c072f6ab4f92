"""The router's view of the workers: registry snapshot, one gRPC channel per worker, local load.

`WorkerPool.run` re-reads the registry every `refresh_s`; a worker whose lease expired drops out
(its channel is closed). Between heartbeats the registry's load figures are stale, so the pool
also counts what this router itself has placed on each worker and not yet finished; a policy sees
the larger of the two views (the registry also reflects other routers' requests). A worker that
failed a call is quarantined for a lease, so requests stop trying it before its lease runs out.

Redis faults (docs/supervision.md): while the registry cannot be read the pool keeps its last view
(counted by `on_degraded("registry")`). When Redis answers again after a failure, or comes back
empty (`Registry.claim_epoch`), the workers re-register within a heartbeat; until then, for one
lease, a known worker missing from the listing is kept, so a Redis restart never empties the pool.
A worker that leaves has its channel closed with a grace period, so calls streaming on it finish
(a worker still serving but missing from the registry answers them).
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
from kvweave.registry import ROLES, Registry, WorkerInfo
from kvweave.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

SERVING_ROLES = ("colocated", "decode")
"""Roles that can serve a whole request alone (a decode worker prefills what it is not handed off)."""
PREFILL_ROLES = ("prefill",)
"""Roles that prefill for decode workers (controlplane/disagg.py decides when)."""

CHANNEL_CLOSE_GRACE_S = 60.0
"""How long calls in flight on the channel of a worker that left the registry may still finish."""

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
        self._quarantined: dict[str, float] = {}
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
                channel = grpc.aio.insecure_channel(info.address, options=_CHANNEL_OPTIONS)
                self.workers[worker_id] = PoolWorker(info, channel, worker_pb2_grpc.WorkerStub(channel))
        if self.on_change is not None:
            self.on_change(dict(Counter(w.info.role for w in self.workers.values())))

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        """Close a left worker's channel once its calls end (at most CHANNEL_CLOSE_GRACE_S): closing
        it at once would cancel calls that a live worker, missing from the registry, still serves."""
        task = asyncio.create_task(channel.close(CHANNEL_CLOSE_GRACE_S))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

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
