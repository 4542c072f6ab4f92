"""The KV index against a real Redis: leading runs agree with lookups; tiers, sizes and leases."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from kvstore.index import KVIndex, local_run, prefix_hits


def hashes(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(15, "big") for i in range(n)]


async def _check(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        index = probe = KVIndex(client)
        prompt = hashes(9000)  # more than one Lua slice of 4000
        await index.replace("a", "device", prompt[:5])
        await index.replace("b", "device", prompt[:3] + prompt[4:8])  # a hole at block 3
        await index.replace("b", "dram", [prompt[3]])  # ... filled from DRAM
        await index.replace("c", "device", prompt[:8500])
        await index.replace("d", "device", prompt[1:])  # everything but the first block
        workers = ["a", "b", "c", "d", "gone"]
        assert await probe.leading_hits(prompt, workers) == {"a": 5, "b": 3, "c": 8500, "d": 0, "gone": 0}
        both = await probe.leading_hits(prompt, workers, ("device", "dram"))
        assert both == {"a": 5, "b": 8, "c": 8500, "d": 0, "gone": 0}
        held = await index.lookup(prompt, workers)
        assert {w: prefix_hits(held[(w, "device")]) for w in workers} == await probe.leading_hits(prompt, workers)
        assert await probe.leading_hits([], workers) == {}
    finally:
        await client.aclose()


def test_leading_hits_match_the_kv_index(redis_url):
    asyncio.run(_check(redis_url))


async def _check_tiers_and_locations(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        index = KVIndex(client, lease_s=0.3)
        p = hashes(6, tag=7)
        await index.replace("a", "device", p[:2], entry_bytes=100)
        await index.replace("a", "ssd", p[:4], entry_bytes=100)  # blocks 0-1 also on device: device wins
        await index.replace("b", "dram", p[2:5], entry_bytes=200)
        # "a" holds the longest leading run (4 blocks); the others would fetch it from "a".
        codes = await index.leading_tiers(p, ["a", "b", "c"])
        assert codes == {"a": b"1133", "b": b"0000", "c": b"0000"}
        assert {w: local_run(c) for w, c in codes.items()} == {"a": 4, "b": 0, "c": 0}
        await index.replace("d", "dram", p[:1], entry_bytes=100)
        assert (await index.leading_tiers(p, ["a", "d"]))["d"] == b"2000"
        await index.clear("d")
        located = await index.locate(p, ["a", "b", "c"])
        assert [[(loc.worker_id, loc.medium, loc.nbytes) for loc in holders] for holders in located] == [
            [("a", "device", 100), ("a", "ssd", 100)],
            [("a", "device", 100), ("a", "ssd", 100)],
            [("b", "dram", 200), ("a", "ssd", 100)],
            [("b", "dram", 200), ("a", "ssd", 100)],
            [("b", "dram", 200)],
            [],
        ]
        assert all(loc.last_access_ms > 0 for holders in located for loc in holders)
        # Only "b" refreshes its lease: "a" disappears from lookups once its lease is over.
        for _ in range(4):
            await asyncio.sleep(0.15)
            await index.refresh("b")
        located = await index.locate(p, ["a", "b"])
        assert [[loc.worker_id for loc in holders] for holders in located] == [[], [], ["b"], ["b"], ["b"], []]
        assert await index.leading_tiers(p, ["a", "b"]) == {"a": b"", "b": b""}
    finally:
        await client.aclose()


def test_leading_tiers_locations_and_lease(redis_url):
    asyncio.run(_check_tiers_and_locations(redis_url))
