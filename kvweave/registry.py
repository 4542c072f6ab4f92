"""Cluster membership in Redis: workers register under a lease and heartbeat; the router lists them.

Layout: `kvweave:worker:<id>` holds the worker's JSON description with a TTL of one lease;
`kvweave:workers` is the set of ids that ever registered. A worker that stops heartbeating
disappears when its key expires (within one lease); `list_workers` also drops its id from the set.

Workers write it and the router reads it, so it sits in the shared bottom layer with the types
both sides exchange through it (`WorkerInfo`, `WorkerLoad`, `ROLES`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from kvweave.defaults import BLOCK_SIZE, REGISTRY_LEASE_S

WORKERS_SET = "kvweave:workers"
EPOCH_KEY = "kvweave:epoch"
"""Set (without expiry) by the routers; found missing, it tells a router that Redis lost its data
(a restarted Redis without persistence), so the workers it knew are re-registering."""
ROLES = ("colocated", "prefill", "decode", "encode")
NODE_IP = "<node-ip>"
"""An `advertise_host` a launcher gives a worker it places on a remote node: advertise that node's IP
(found where the worker runs, e.g. by Ray), not a wildcard bind address."""


def worker_key(worker_id: str) -> str:
    return f"kvweave:worker:{worker_id}"


@dataclass
class WorkerLoad:
    num_running: int = 0
    num_waiting: int = 0
    num_queued_prefill_tokens: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    prefix_query_tokens: int = 0
    """Prompt tokens looked up in the prefix cache since the worker started."""
    prefix_hit_tokens: dict[str, int] = field(default_factory=dict)
    """Of those, the tokens each source served: device, dram, ssd, peer."""
    kv_entries: dict[str, int] = field(default_factory=dict)
    """KV entries held now per tier."""

    @property
    def kv_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0


@dataclass
class WorkerInfo:
    worker_id: str
    address: str
    """host:port of the worker's gRPC service."""
    model: str
    role: str = "colocated"
    max_num_seqs: int = 64
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    """The engine's token budget per step (a prompt this short fits one chunked-prefill step)."""
    block_size: int = BLOCK_SIZE
    metrics_port: int = 0
    """Port of the worker's Prometheus metrics (HTTP GET /metrics) on the host of `address`; 0: none."""
    kv_costs_ms: dict[str, float] = field(default_factory=dict)
    """Measured ms per prompt token to get its KV from each source (device, dram, ssd, peer) or to
    compute it (recompute); the router's cost model uses them."""
    load: WorkerLoad = field(default_factory=WorkerLoad)
    updated_at: float = 0.0

    @property
    def metrics_target(self) -> str | None:
        """host:port of the worker's Prometheus metrics, or None when it serves none."""
        return f"{self.address.rsplit(':', 1)[0]}:{self.metrics_port}" if self.metrics_port else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerInfo":
        d = json.loads(text)
        d["load"] = WorkerLoad(**d.get("load", {}))
        return cls(**d)


class Registry:
    """Reads and writes membership through a `redis.asyncio.Redis` client."""

    def __init__(self, redis, lease_s: float = REGISTRY_LEASE_S) -> None:
        assert lease_s > 0
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)

    async def heartbeat(self, info: WorkerInfo) -> None:
        """Register or renew: one round trip."""
        info.updated_at = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(info.worker_id), info.to_json(), px=self.lease_ms)
            pipe.sadd(WORKERS_SET, info.worker_id)
            await pipe.execute()

    async def deregister(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(worker_key(worker_id))
            pipe.srem(WORKERS_SET, worker_id)
            await pipe.execute()

    async def claim_epoch(self) -> bool:
        """Mark this Redis as seen; True when it was not marked yet (first use, or it lost its data)."""
        return bool(await self.redis.set(EPOCH_KEY, b"1", nx=True))

    async def list_workers(self) -> list[WorkerInfo]:
        """Live workers (two round trips); ids whose lease expired are dropped from the set."""
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(WORKERS_SET))
        if not ids:
            return []
        values = await self.redis.mget([worker_key(i) for i in ids])
        dead = [i for i, v in zip(ids, values) if v is None]
        if dead:
            await self.redis.srem(WORKERS_SET, *dead)
        return [WorkerInfo.from_json(v) for v in values if v is not None]
