"""KVIndex.leading_hits against a real Redis: it must agree with KVIndex.lookup + prefix_hits."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from kvstore.index import KVIndex, prefix_hits


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
