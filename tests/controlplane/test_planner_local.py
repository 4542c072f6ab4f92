"""The planner end to end on this machine: real Redis, real `kvweave worker` processes on a tiny
model started and stopped by the local connector (LocalWorkers), a real router, real requests.

The planner runs with correction off, so its decisions follow the observed load (running requests
per decode worker against `decode_running`) and not the latency of 2 busy cores; the test steps
the planner itself (one `PlannerLoop.step` per interval) and waits for the registry to show each
change, with generous deadlines and no timing assertions. Whether ITL then returns under its
target within two intervals is not asserted here: on these machines the latency says more about
the other processes sharing the cores than about the pool.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

import kvweave
from controlplane.cluster import LocalWorkers
from controlplane.cluster_config import ClusterConfig
from controlplane.planner_connectors import LauncherConnector
from controlplane.planner_main import PlannerConfig, PlannerLoop, model_id
from controlplane.planner_observer import LoadObserver
from controlplane.procs import child_env
from controlplane.router import RouterConfig
from controlplane.router_main import RouterServer, ServeOptions
from kvweave.registry import Registry

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 512, "num_threads": 1}
NUM_IN_FLIGHT = 8


async def wait_for(predicate, what: str, timeout: float = 180.0, state=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what} {state()}"
        await asyncio.sleep(0.2)


async def keep_busy(target: str, stop: asyncio.Event) -> int:
    """Keep NUM_IN_FLIGHT long generations running through the router until `stop`; returns how many ended."""
    done = 0

    async def one_after_another(client: kvweave.AsyncClient, i: int) -> None:
        nonlocal done
        while not stop.is_set():
            async for _ in client.generate(f"Request {i}: the quick brown fox", max_tokens=200, ignore_eos=True):
                if stop.is_set():
                    break
            done += 1

    async with kvweave.AsyncClient(target, timeout=300) as client:
        await asyncio.gather(*(one_after_another(client, i) for i in range(NUM_IN_FLIGHT)))
    return done


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_load_step_adds_a_decode_worker_and_its_end_removes_it(redis_url, tiny_hf_model, tmp_path):
    model = str(tiny_hf_model)
    cluster = ClusterConfig(workers=1, model=model, redis_url=redis_url, engine_args=ENGINE_ARGS, lease_s=2.0,
                            insecure=True)
    workers = LocalWorkers(cluster, {}, redis_url, tmp_path, child_env())
    connector = LauncherConnector(workers, roles=("decode",))
    config = PlannerConfig(connector="local", model=model, redis_url=redis_url, decode_running=NUM_IN_FLIGHT / 2,
                           min_replicas=1, max_replicas=2, interval_s=1.0, grace_intervals=0, correction=False)
    client = aioredis.Redis.from_url(redis_url)
    registry = Registry(client)
    loop = PlannerLoop(config, LoadObserver(registry, model_id(model)), connector)
    router = RouterServer(RouterConfig(redis_url=redis_url, model=model, lease_s=2.0, refresh_s=0.1),
                          ServeOptions(grace_s=0.5))

    async def decode_ids() -> set[str]:
        return {w.worker_id for w in await registry.list_workers() if w.role == "decode"}

    stop_load = asyncio.Event()
    load = None
    try:
        [d] = await loop.step()  # an empty pool is brought to min_replicas
        assert (d.current_replicas, d.target_replicas, d.reason) == (0, 1, "bounds")
        [first] = workers.worker_ids  # decode-0-<suffix>: ids are made unique in a shared Redis
        assert first.startswith("decode-0-")
        await wait_for(lambda: _eq(decode_ids(), {first}), "the first decode worker registers")
        await router.start()

        load = asyncio.create_task(keep_busy(router.grpc_address, stop_load))
        decisions = []

        async def scaled_up() -> bool:
            decisions.extend(await loop.step())
            await asyncio.sleep(config.interval_s)
            return decisions[-1].target_replicas == 2

        await wait_for(scaled_up, "the planner asks for a second decode worker under load",
                       state=lambda: (load, decisions[-3:]))
        assert decisions[-1].reason == "scale_up" and decisions[-1].current_replicas == 1
        first_, second = workers.worker_ids
        assert first_ == first and second.startswith("decode-1-") and workers.roles[second] == "decode"
        await wait_for(lambda: _eq(decode_ids(), {first, second}), "the second decode worker registers")

        stop_load.set()
        assert await load > 0
        load = None

        async def scaled_down() -> bool:
            decisions.extend(await loop.step())
            await asyncio.sleep(config.interval_s)
            return decisions[-1].target_replicas == 1

        await wait_for(scaled_down, "the planner stops a decode worker once the load is gone",
                       state=lambda: decisions[-3:])
        assert decisions[-1].reason == "scale_down"
        assert workers.roles == {first: "decode"}  # the newest went, by SIGTERM: it deregistered
        assert await decode_ids() == {first}
    finally:
        stop_load.set()
        if load is not None:
            load.cancel()
        await router.stop()
        await connector.close()
        await client.aclose()


async def _eq(coro, expected) -> bool:
    return await coro == expected
