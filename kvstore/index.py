"""The KV index in Redis: which worker holds which block, in which medium (tier).

Layout: one Redis set per (worker, medium), `kvweave:kv:<worker_id>:<medium>`, of 16-byte block
hashes. Workers apply their KV events (stored / removed) in batches, one pipeline per batch, and
refresh the sets' TTL with their lease, so a dead worker's entries vanish with it. A lookup asks
every (worker, medium) set about all of a request's hashes (SMISMEMBER) in ONE pipelined round
trip. Redis never holds KV bytes.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvstore.keys import BlockHash

MEDIUMS = ("device", "dram", "ssd")
_BATCH = 1000


def index_key(worker_id: str, medium: str = "device") -> str:
    return f"kvweave:kv:{worker_id}:{medium}"


class KVIndex:
    """Writes and reads the index through a `redis.asyncio.Redis` client."""

    def __init__(self, redis, lease_s: float = 3.0) -> None:
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)

    async def apply_events(self, worker_id: str, events: Iterable) -> None:
        """Apply BlockStored / BlockRemoved events (worker.block_manager) in one pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            touched = set()
            for ev in events:
                key = index_key(worker_id, ev.medium)
                touched.add(key)
                op = pipe.sadd if type(ev).__name__ == "BlockStored" else pipe.srem
                for i in range(0, len(ev.block_hashes), _BATCH):
                    op(key, *ev.block_hashes[i:i + _BATCH])
            for key in touched:
                pipe.pexpire(key, self.lease_ms)
            if touched:
                await pipe.execute()

    async def replace(self, worker_id: str, medium: str, hashes: Sequence[BlockHash]) -> None:
        """Publish a full snapshot (after a restart or a lapsed lease)."""
        key = index_key(worker_id, medium)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for i in range(0, len(hashes), _BATCH):
                pipe.sadd(key, *hashes[i:i + _BATCH])
            pipe.pexpire(key, self.lease_ms)
            await pipe.execute()

    async def refresh(self, worker_id: str, mediums: Sequence[str] = MEDIUMS) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in mediums:
                pipe.pexpire(index_key(worker_id, m), self.lease_ms)
            await pipe.execute()

    async def clear(self, worker_id: str) -> None:
        await self.redis.delete(*(index_key(worker_id, m) for m in MEDIUMS))

    async def lookup(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str],
                     mediums: Sequence[str] = ("device",)) -> dict[tuple[str, str], list[bool]]:
        """For each (worker, medium): which of `hashes` it holds. One round trip."""
        if not hashes or not worker_ids:
            return {}
        pairs = [(w, m) for w in worker_ids for m in mediums]
        async with self.redis.pipeline(transaction=False) as pipe:
            for w, m in pairs:
                pipe.smismember(index_key(w, m), list(hashes))
            results = await pipe.execute()
        return {pair: [bool(x) for x in res] for pair, res in zip(pairs, results)}


def prefix_hits(held: Sequence[bool]) -> int:
    """Number of leading blocks held (a prefix cache can only use an unbroken run from the start)."""
    n = 0
    for h in held:
        if not h:
            break
        n += 1
    return n
