"""The router's worker pool across a Redis that comes back EMPTY (a restart without persistence),
on a real redis-server and a real gRPC stream: the workers it knew are kept for a lease while they
re-register, and a call streaming on a worker's channel is not cut off while they do. Before, the
first refresh after the restart listed no worker, the pool dropped them all and closed their
channels, and every call in flight ended in a CancelledError (requests hung at the frontends)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.worker_pool import WorkerPool
from kvweave.registry import Registry, WorkerInfo

LEASE_S = 0.5


async def _health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server, servicer = grpc.aio.server(), health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


@pytest.mark.asyncio
async def test_pool_keeps_workers_and_streams_when_redis_comes_back_empty(redis_url):
    server, servicer, port = await _health_server()
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, LEASE_S)
    info = WorkerInfo("w0", f"127.0.0.1:{port}", "m")
    await registry.heartbeat(info)
    pool = WorkerPool(registry, "m", refresh_s=3600)  # refreshed by hand below
    degraded: list[str] = []
    pool.on_degraded = degraded.append
    try:
        await pool.start()
        assert [w.worker_id for w in pool.eligible()] == ["w0"]
        # a long call streaming on the worker's channel (grpc.health Watch streams status changes)
        call = health_pb2_grpc.HealthStub(pool.workers["w0"].channel).Watch(health_pb2.HealthCheckRequest())
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING

        await client.flushall()  # Redis restarted empty: no registry, no epoch mark
        await pool.refresh()
        assert [w.worker_id for w in pool.eligible()] == ["w0"]  # kept while it re-registers
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        read = await asyncio.wait_for(call.read(), 5)  # the stream goes on
        assert read.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await asyncio.sleep(LEASE_S * 1.2)  # the worker never re-registered: after a lease it is gone
        await pool.refresh()
        assert pool.workers == {}
        # a worker that stays out of the registry is dead or hung: its calls end at once (the
        # router retries or migrates them, tests/faults/test_worker_faults.py)
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await asyncio.wait_for(call.read(), 5)
        assert degraded == []
    finally:
        await pool.close()
        await client.aclose()
        await server.stop(0)


@pytest.mark.asyncio
async def test_pool_keeps_its_view_while_redis_is_unreachable(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client, LEASE_S)
    await registry.heartbeat(WorkerInfo("w0", "127.0.0.1:1", "m"))
    degraded: list[str] = []
    pool = WorkerPool(registry, "m", refresh_s=0.01, on_degraded=degraded.append)
    try:
        await pool.start()
        dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        pool.registry = Registry(dead, LEASE_S)  # Redis gone: every refresh fails
        for _ in range(200):
            if len(degraded) >= 2:
                break
            await asyncio.sleep(0.01)
        assert degraded[:2] == ["registry", "registry"]
        assert [w.worker_id for w in pool.eligible()] == ["w0"]  # the last view is kept
        await dead.aclose()
    finally:
        await pool.close()
        await client.aclose()
