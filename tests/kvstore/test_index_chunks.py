"""The router's combined lookup against a real Redis: leading blocks and chunk-caches in ONE round trip."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from kvstore.keys import chunk_block_keys, chunk_hash
from kvstore.index import MEDIUMS, KVIndex

BS = 16
EXTRA = b"model\x00tenant"


def hashes(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(15, "big") for i in range(n)]


def chunk_keys(tokens: range) -> list[bytes]:
    return chunk_block_keys(chunk_hash(list(tokens), EXTRA), len(tokens), BS)


class CountingRedis(aioredis.Redis):
    """A real client that counts the commands it sends (pipelines count each queued command)."""

    sent = 0

    async def execute_command(self, *args, **options):
        CountingRedis.sent += 1
        return await super().execute_command(*args, **options)


async def _commandstats(client) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in (await client.info("commandstats")).items()}


async def _check(url: str) -> None:
    client = CountingRedis.from_url(url)
    try:
        index = KVIndex(client)
        prompt = hashes(4, tag=3)
        # Four chunks: 40 tokens (3 entries), 16 (1), 33 (3), 20 (2).
        a, b, c, d = (chunk_keys(r) for r in (range(100, 140), range(200, 216), range(300, 333), range(400, 420)))
        await index.replace("w0", "device", prompt[:2])
        await index.replace("w0", "dram", a + b[:0] + c[1:] + d[:1])  # a whole; c lacks entry 0; d half here...
        await index.replace("w0", "ssd", d[1:] + c[:0])                # ... and half on SSD
        await index.replace("w1", "ssd", b)                            # b only on w1, on SSD
        await index.replace("w1", "device", prompt[:1])
        tiers = {"w0": MEDIUMS, "w1": MEDIUMS, "w2": ("device",)}
        await index.route_tiers(prompt, tiers, [a])  # loads the script: the next calls are one EVALSHA each

        before, sent = await _commandstats(client), CountingRedis.sent
        prefix, chunks = await index.route_tiers(prompt, tiers, [a, b, c, d])
        after, sent = await _commandstats(client), CountingRedis.sent - sent - 1  # minus the second INFO
        assert sent == 1
        assert after["cmdstat_evalsha"] - before["cmdstat_evalsha"] == 1
        assert after.get("cmdstat_eval", 0) == before.get("cmdstat_eval", 0)

        # The prefix part is exactly leading_tiers'.
        assert prefix == await index.leading_tiers(prompt, tiers) == {"w0": b"11", "w1": b"10", "w2": b"00"}
        # a: w0 holds every entry in DRAM; b: w1 on SSD; c: an entry missing everywhere; d: DRAM + SSD -> SSD.
        assert chunks == {"w0": b"20-3", "w1": b"03-0", "w2": b"00-0"}

        # Only the tiers each worker reports are asked: without its SSD, w0 no longer holds d.
        _, chunks = await index.route_tiers(prompt, {"w0": ("device", "dram"), "w1": ("device",)}, [a, b, c, d])
        assert chunks == {"w0": b"2---", "w1": b"0---"}
        # Chunk-caches are looked for in the host tiers only (chunk_mediums): the device is not asked.
        await index.replace("w2", "device", c)
        _, chunks = await index.route_tiers(prompt, tiers, [c])
        assert chunks == {"w0": b"-", "w1": b"-", "w2": b"-"}
        _, chunks = await index.route_tiers(prompt, tiers, [c], chunk_mediums=MEDIUMS)
        assert chunks == {"w0": b"0", "w1": b"0", "w2": b"1"}

        # No prefix block (a prompt shorter than a block) still finds the chunks; no chunks = leading_tiers.
        prefix, chunks = await index.route_tiers([], tiers, [a, b])
        assert prefix == {"w0": b"", "w1": b"", "w2": b""} and chunks == {"w0": b"20", "w1": b"03", "w2": b"00"}
        prefix, chunks = await index.route_tiers(prompt, tiers, [])
        assert prefix == {"w0": b"11", "w1": b"10", "w2": b"00"} and chunks == {"w0": b"", "w1": b"", "w2": b""}
    finally:
        await client.aclose()


def test_route_tiers_finds_chunks_in_one_round_trip(redis_url):
    asyncio.run(_check(redis_url))


async def _check_many_entries(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        index = KVIndex(client)
        big = chunk_keys(range(0, 9000 * BS))  # 9000 entries: more than one Lua slice of 4000
        small = chunk_keys(range(5, 9))
        await index.replace("w0", "dram", big[:5000])
        await index.replace("w0", "ssd", big[4000:])
        await index.replace("w1", "dram", big[:-1] + small)
        _, chunks = await index.route_tiers(hashes(3), {"w0": MEDIUMS, "w1": MEDIUMS}, [big, small])
        assert chunks == {"w0": b"30", "w1": b"02"}
    finally:
        await client.aclose()


def test_route_tiers_handles_chunks_beyond_one_slice(redis_url):
    asyncio.run(_check_many_entries(redis_url))
