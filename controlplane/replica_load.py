"""Router replicas share their in-flight requests per worker through Redis.

Several `kvweave router` processes over one Redis index make the same decision for the same state,
and the state includes load: without sharing, each replica would see only its own requests
between two heartbeats of a worker and several replicas could pile onto one worker at once.

Layout: `kvweave:router_load:<router_id>` holds one router's JSON {worker_id: [waiting, running,
queued prefill tokens]} (the requests it placed there and not yet finished) with a TTL of `ttl_s`;
`kvweave:routers` is the set of ids that published (an id whose key expired is dropped when read,
as the registry does). Every `sync_s` a background task writes this router's entry (one SET, when
its counts changed or half the TTL has passed) and reads the others' (SMEMBERS + MGET), summing
them into each `PoolWorker`'s `num_remote_*`. A policy sees, per worker, the larger of the
registry's figure (the worker's own heartbeat, every router's requests but up to a heartbeat old)
and this router's in-flight count plus the other replicas' (at most `sync_s` + their `sync_s`
old): no decision waits for Redis.

With a cluster secret an entry is `<hex HMAC-SHA256 of the JSON under the "router_load" sub-key>`
+ "\\n" + the JSON, and an entry without a valid signature is ignored, so a process that can write
into Redis cannot steer traffic by faking load; counts are capped at `MAX_COUNT` either way.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping

import redis

from controlplane.worker_pool import PoolWorker
from kvweave import cluster_secret
from kvweave.registry import sign_entry, verified_entry

logger = logging.getLogger(__name__)

ROUTERS_SET = "kvweave:routers"
MAX_COUNT = 1 << 24
"""Largest count (requests or tokens) taken from another router's entry."""

Counts = tuple[int, int, int]
"""(waiting, running, queued prefill tokens) of one worker."""


def load_key(router_id: str) -> str:
    return f"kvweave:router_load:{router_id}"


class ReplicaLoad:
    """Publishes this router's in-flight requests per worker and sums the other replicas'."""

    def __init__(self, client: redis.asyncio.Redis, router_id: str, sync_s: float, ttl_s: float,
                 key: bytes | None = None) -> None:
        """`key`: the signing key (default: this process's "router_load" sub-key of the cluster secret)."""
        assert sync_s > 0 and ttl_s > sync_s
        self.redis = client
        self.router_id = router_id
        self.sync_s = sync_s
        self.ttl_ms = int(ttl_s * 1000)
        self.key = key if key is not None else cluster_secret.derive("router_load")
        self.num_rejected = 0
        """Other routers' entries ignored (bad signature or malformed)."""
        self._published: tuple[dict, float] = ({}, 0.0)
        """The counts last written and when (monotonic)."""
        self._failed = False
        self._task: asyncio.Task | None = None

    def start(self, workers: Mapping[str, PoolWorker]) -> None:
        """Sync `workers` (the pool's live dict) every `sync_s` until `close`."""
        self._task = asyncio.create_task(self._run(workers), name="kvweave-replica-load")

    async def close(self) -> None:
        """Stop syncing and withdraw this router's entry (other replicas stop counting it at once)."""
        if self._task is not None:
            while not self._task.done():  # redis-py may swallow one cancellation (see WorkerPool.close)
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            self._task = None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(load_key(self.router_id))
                pipe.srem(ROUTERS_SET, self.router_id)
                await pipe.execute()
        except (redis.RedisError, OSError) as e:
            logger.debug("could not withdraw the router's load entry (it expires by itself): %s", e)

    async def _run(self, workers: Mapping[str, PoolWorker]) -> None:
        while True:
            try:
                await self.sync(workers)
                self._failed = False
            except (redis.RedisError, OSError) as e:
                if not self._failed:
                    logger.warning("router replica load not synced (each replica sees only its own requests "
                                   "until Redis answers): %s", e)
                self._failed = True
                for w in workers.values():
                    w.num_remote_waiting = w.num_remote_running = w.num_remote_prefill_tokens = 0
            await asyncio.sleep(self.sync_s)

    async def sync(self, workers: Mapping[str, PoolWorker]) -> None:
        """Publish this router's counts and read the others' into `workers` (two round trips)."""
        own = {worker_id: [w.num_local_waiting, w.num_local_running, w.num_local_prefill_tokens]
               for worker_id, w in workers.items()
               if w.num_local_waiting or w.num_local_running or w.num_local_prefill_tokens}
        last, at = self._published
        now = time.monotonic()
        publish = own != last or now - at > self.ttl_ms / 2000
        async with self.redis.pipeline(transaction=False) as pipe:
            if publish:
                pipe.set(load_key(self.router_id), self._sign(json.dumps(own)), px=self.ttl_ms)
                pipe.sadd(ROUTERS_SET, self.router_id)
            pipe.smembers(ROUTERS_SET)
            ids = (await pipe.execute())[-1]
        if publish:
            self._published = (own, now)
        others = sorted(i.decode() if isinstance(i, bytes) else i for i in ids)
        others = [i for i in others if i != self.router_id]
        sums = await self._read(others) if others else {}
        for worker_id, w in workers.items():
            w.num_remote_waiting, w.num_remote_running, w.num_remote_prefill_tokens = sums.get(worker_id, (0, 0, 0))

    async def _read(self, router_ids: list[str]) -> dict[str, Counts]:
        values = await self.redis.mget([load_key(i) for i in router_ids])
        gone = [i for i, v in zip(router_ids, values) if v is None]
        if gone:
            await self.redis.srem(ROUTERS_SET, *gone)
        sums: dict[str, list[int]] = {}
        for value in values:
            if value is None:
                continue
            entry = self._verify(value)
            for worker_id, counts in (entry or {}).items():
                total = sums.setdefault(worker_id, [0, 0, 0])
                for k in range(3):
                    total[k] += counts[k]
        return {worker_id: tuple(total) for worker_id, total in sums.items()}

    def _sign(self, text: str) -> str:
        return sign_entry(self.key, text)

    def _verify(self, value: bytes) -> dict[str, list[int]] | None:
        try:
            entry = json.loads(verified_entry(self.key, value))
            return {str(worker_id): [min(max(int(c[k]), 0), MAX_COUNT) for k in range(3)]
                    for worker_id, c in entry.items()}
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            self.num_rejected += 1
            logger.debug("ignoring a router load entry: %s", e)
            return None
