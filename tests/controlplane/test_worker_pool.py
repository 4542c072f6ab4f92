"""The router's worker pool stops even when its refresh loop absorbs a cancellation (as redis-py's
asyncio client can when the CancelledError lands inside a command): before this was handled, the
router's shutdown could wait forever (seen as a rare hang of `kvweave bench router`)."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from kvweave.registry import Registry
from controlplane.worker_pool import WorkerPool


@pytest.mark.asyncio
async def test_close_ends_a_refresh_loop_that_swallowed_a_cancel(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    pool = WorkerPool(Registry(client), "m", refresh_s=0.01)
    swallowed = []

    async def refresh() -> None:  # a refresh whose Redis call absorbs the cancellation
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            swallowed.append(True)

    await pool.start()  # (its first refresh is the real one, against Redis)
    pool.refresh = refresh
    await asyncio.sleep(0.03)  # the loop is now inside refresh
    await asyncio.wait_for(pool.close(), 5)
    assert swallowed and pool._task is None
    await client.aclose()
