"""Cluster membership in Redis: workers register under a lease and heartbeat; the router lists them.

Layout: `kvweave:worker:<id>` holds the worker's JSON description with a TTL of one lease;
`kvweave:workers` is the set of ids that ever registered. A worker that stops heartbeating
disappears when its key expires (within one lease); `list_workers` also drops its id from the set.

Workers write it and the router reads it, so it sits in the shared bottom layer with the types
both sides exchange through it (`WorkerInfo`, `WorkerLoad`, `ROLES`).

Signed entries: with a cluster secret (kvweave/cluster_secret.py) an entry is
`<hex HMAC-SHA256 of the JSON>` + "\n" + the JSON, under the "registry" sub-key, and a reader with
the secret ignores (logs once per id, counts in `num_rejected`) an entry without a valid signature
or whose id is not its key's, so a process that can write into Redis does not become a worker.
Without a secret entries are plain JSON, and a signature is skipped unchecked.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from kvweave import cluster_secret
from kvweave.defaults import BLOCK_SIZE, REGISTRY_LEASE_S

logger = logging.getLogger(__name__)

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
    """Requests not yet running; an encode worker's: the images its Encode calls are encoding."""
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
    max_num_seqs: int = 128
    max_model_len: int = 2048
    max_num_batched_tokens: int = 2048
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


def sign_entry(key: bytes | None, text: str) -> str:
    """A Redis entry's text with its HMAC-SHA256 under `key` in front ("<hex>\n<text>"); the text
    alone without a key (an open cluster)."""
    if key is None:
        return text
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest() + "\n" + text


def verified_entry(key: bytes | None, value: bytes | str) -> str:
    """The text of an entry `sign_entry` wrote; ValueError when `key` is set and its signature is
    missing or wrong."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    signature, sep, body = text.partition("\n")
    if not sep:
        signature, body = "", text
    if key is not None:
        expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ValueError("no valid signature")
    return body


class Registry:
    """Reads and writes membership through a `redis.asyncio.Redis` client. `key`: the signing key
    (default: this process's "registry" sub-key of the cluster secret; None without one)."""

    def __init__(self, redis, lease_s: float = REGISTRY_LEASE_S, key: bytes | None = None) -> None:
        assert lease_s > 0
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)
        self.key = key if key is not None else cluster_secret.derive("registry")
        self.num_rejected = 0
        """Entries ignored for a missing or wrong signature."""
        self._rejected_ids: set[str] = set()

    def _sign(self, text: str) -> str:
        return sign_entry(self.key, text)

    def _verify(self, worker_id: str, value: bytes | str) -> WorkerInfo | None:
        try:
            info = WorkerInfo.from_json(verified_entry(self.key, value))
            if info.worker_id != worker_id:
                raise ValueError("its id is not its key's")
            return info
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # not the fields of an entry
            self.num_rejected += 1
            if worker_id not in self._rejected_ids and len(self._rejected_ids) < 1024:
                self._rejected_ids.add(worker_id)
                logger.warning("ignoring the registry entry of %r: %s", worker_id[:64], str(e)[:100])
            return None

    async def heartbeat(self, info: WorkerInfo) -> None:
        """Register or renew: one round trip."""
        info.updated_at = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(worker_key(info.worker_id), self._sign(info.to_json()), px=self.lease_ms)
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
        infos = (self._verify(i, v) for i, v in zip(ids, values) if v is not None)
        return [info for info in infos if info is not None]
