"""kvweave.redis_pipe: concurrent commands on one connection against a real redis-server."""
from __future__ import annotations

import asyncio
import random

import pytest
import redis
import redis.asyncio

from controlplane.procs import RedisServer
from kvstore.index import KVIndex
from kvweave.redis_pipe import PipelinedScript, connect_pipelined


def run(coro):
    return asyncio.run(coro)


def test_concurrent_commands_get_their_own_replies(redis_url):
    async def main():
        client = connect_pipelined(redis_url)
        try:
            values = [random.randbytes(random.randrange(1, 5000)) for _ in range(300)]
            replies = await asyncio.gather(*(client.execute("ECHO", v) for v in values))
            assert replies == values
            assert await client.execute("SET", "k", 7) == b"OK"
            assert await asyncio.gather(*(client.execute("INCR", "k") for _ in range(50))) == list(range(8, 58))
        finally:
            await client.close()
    run(main())


def test_an_error_reply_fails_its_command_only(redis_url):
    async def main():
        client = connect_pipelined(redis_url)
        try:
            a, bad, b = await asyncio.gather(client.execute("ECHO", "a"), client.execute("NOSUCHCOMMAND", 1),
                                             client.execute("ECHO", "b"), return_exceptions=True)
            assert (a, b) == (b"a", b"b")
            assert isinstance(bad, redis.ResponseError) and "unknown command" in str(bad)
            assert await client.execute("PING") == b"PONG"
        finally:
            await client.close()
    run(main())


def test_script_loads_itself_once(redis_url):
    async def main():
        client = connect_pipelined(redis_url)
        admin = redis.asyncio.Redis.from_url(redis_url)
        try:
            await admin.script_flush()
            script = PipelinedScript(client, "return {KEYS[1], ARGV[1], #ARGV[2]}")
            assert await admin.script_exists(script.sha) == [False]
            replies = await asyncio.gather(*(script(keys=["k"], args=[i, b"\x00" * i]) for i in range(20)))
            assert replies == [[b"k", str(i).encode(), i] for i in range(20)]
            assert await admin.script_exists(script.sha) == [True]  # the EVAL fallback loaded it
            with pytest.raises(redis.ResponseError, match="boom"):
                await PipelinedScript(client, "return redis.error_reply('boom')")()
        finally:
            await admin.aclose()
            await client.close()
    run(main())


def test_kv_index_reads_are_the_same_through_either_client(redis_url):
    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        pipelined = connect_pipelined(redis_url)
        try:
            plain, piped = KVIndex(client), KVIndex(client, pipelined=pipelined)
            rng = random.Random(1)
            prompt = [rng.randbytes(16) for _ in range(40)]
            await plain.replace("w0", "device", prompt[:30])
            await plain.replace("w1", "dram", prompt[:12])
            await plain.replace("w1", "ssd", prompt[12:35])
            await plain.replace("w2", "ssd", [rng.randbytes(16) for _ in range(100)])
            tiers = {"w0": ("device",), "w1": ("device", "dram", "ssd"), "w2": ("dram", "ssd")}
            chunks = [prompt[30:35], prompt[35:40], []]
            want = await plain.route_tiers(prompt, tiers, chunks)
            assert want[0]["w1"] == b"2" * 12 + b"3" * 23  # the fixture means what the test says
            assert await piped.route_tiers(prompt, tiers, chunks) == want
            many = await asyncio.gather(*(piped.leading_tiers(prompt[:n], tiers) for n in range(1, 41)))
            assert many == [await plain.leading_tiers(prompt[:n], tiers) for n in range(1, 41)]
        finally:
            await pipelined.close()
            await client.aclose()
    run(main())


def test_password_and_database():
    server = RedisServer(password="s3cret pass").start()
    try:
        async def main():
            anonymous = connect_pipelined(server.url)
            with pytest.raises(redis.ResponseError, match="NOAUTH"):
                await anonymous.execute("PING")
            await anonymous.close()
            wrong = connect_pipelined(server.client_url.replace("s3cret", "other"))
            with pytest.raises(redis.ConnectionError, match="set-up"):
                await wrong.execute("PING")
            await wrong.close()
            client = connect_pipelined(server.client_url.replace("/0", "/3"))
            admin = redis.asyncio.Redis.from_url(server.client_url.replace("/0", "/3"))
            try:
                await client.execute("SET", "in-db-3", "yes")
                assert await admin.get("in-db-3") == b"yes"
            finally:
                await admin.aclose()
                await client.close()
        run(main())
    finally:
        server.stop()


def test_a_dropped_connection_fails_what_is_in_flight_and_reconnects(redis_url):
    async def main():
        client = connect_pipelined(redis_url)
        admin = redis.asyncio.Redis.from_url(redis_url)
        try:
            my_id = await client.execute("CLIENT", "ID")
            blocked = asyncio.ensure_future(client.execute("BLPOP", "never", 5))
            await asyncio.sleep(0.2)
            await admin.client_kill_filter(_id=my_id)
            with pytest.raises(redis.ConnectionError):
                await blocked
            assert await client.execute("ECHO", "again") == b"again"
            assert await client.execute("CLIENT", "ID") != my_id
        finally:
            await admin.aclose()
            await client.close()
    run(main())


def test_an_overdue_reply_times_out_the_connection(redis_url):
    async def main():
        client = connect_pipelined(redis_url, timeout_s=0.3)
        try:
            slow = client.execute("BLPOP", "never", 3)
            behind = client.execute("ECHO", "behind the slow one")
            results = await asyncio.gather(slow, behind, return_exceptions=True)
            assert all(isinstance(r, redis.TimeoutError) for r in results), results
            assert await client.execute("ECHO", "fresh") == b"fresh"  # a new connection
        finally:
            await client.close()
    run(main())


def test_a_cancelled_caller_does_not_shift_the_replies(redis_url):
    async def main():
        client = connect_pipelined(redis_url)
        try:
            waiting = asyncio.ensure_future(client.execute("BLPOP", "soon", 2))
            await asyncio.sleep(0.1)
            waiting.cancel()
            after = asyncio.ensure_future(client.execute("ECHO", "mine"))
            admin = redis.asyncio.Redis.from_url(redis_url)
            await admin.rpush("soon", "x")  # answers the cancelled BLPOP first
            await admin.aclose()
            assert await after == b"mine"
        finally:
            await client.close()
    run(main())


def test_unreachable_and_tls_urls():
    async def main():
        from controlplane.procs import free_port

        client = connect_pipelined(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1.0)
        with pytest.raises(redis.ConnectionError, match="cannot connect to Redis at 127.0.0.1"):
            await client.execute("PING")
        with pytest.raises(redis.ConnectionError, match="cannot connect"):  # and again: no stuck connect
            await client.execute("PING")
        await client.close()
        with pytest.raises(redis.ConnectionError, match="closed"):
            await client.execute("PING")
    run(main())
    assert connect_pipelined("rediss://127.0.0.1:6380/0") is None
