"""The planner's ray connector on a real local Ray cluster (127.0.0.1, token auth off, temp dir under
the test's folder): controlplane/planner_connectors.LauncherConnector over the Ray launcher's
workers (controlplane/ray_launcher.RayWorkers), tiny workers as Ray actors.

The module shares one cluster (Ray starts slowly), as `kvweave serve --launcher ray --decode-workers 1
--policy round_robin` runs it: Redis, the router and one decode worker actor. The connector runs
in-process beside it: scaling the decode pool up adds an actor named `kvweave-decode-1` in the
cluster's Ray namespace whose worker registers and serves through the router; scaling it down stops
that worker (it deregisters, well before its lease would expire) and kills the actor. A separate
`kvweave planner --connector ray --ray-address ...` process attaches to the same Ray cluster, counts
the actors it finds there by name and adds a prefill worker (`--once`): a detached actor that keeps
serving after that process exits, and that a second planner process counts as its own (`--once
--dry-run`). What such a planner does with the actors it adopts (add with their engine settings,
remove, leave them at its stop) is checked in-process last, as it takes the cluster's worker away.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

import kvweave
from controlplane.cluster import LocalCluster
from controlplane.planner_connectors import ConnectorError, LauncherConnector
from kvweave.registry import Registry

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "num_threads": 1}
NAMESPACE = "kvweave-test"


@pytest.fixture(scope="module")
def ray_cluster(tiny_hf_model, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from controlplane.ray_launcher import RayStartError
    from worker.ray_actor import WorkerActor

    assert not ray.is_initialized()
    cluster = LocalCluster(workers=0, decode_workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS,
                           launcher="ray", ray_actor=WorkerActor, ray_namespace=NAMESPACE, policy="round_robin",
                           cpus_per_worker=0.5, insecure=True, ray_temp_dir=str(tmp_path_factory.mktemp("ray")),
                           startup_timeout=240)
    try:
        cluster.start()
    except RayStartError as e:
        pytest.skip(f"Ray cannot start here: {e}")
    yield cluster
    cluster.stop()


def named_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}


async def registered(cluster: LocalCluster) -> set[str]:
    return set(await registered_addresses(cluster))


def eventually(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)


async def registered_addresses(cluster: LocalCluster) -> dict[str, str]:
    client = aioredis.Redis.from_url(cluster.redis_url)
    try:
        return {w.worker_id: w.address for w in await Registry(client).list_workers()}
    finally:
        await client.aclose()


async def wait_for(predicate, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.2)


async def served_by(cluster: LocalCluster, num_requests: int) -> set[str]:
    async with kvweave.AsyncClient(cluster.grpc_target, timeout=120) as client:
        completions = [await client.complete("Hello", max_tokens=2, ignore_eos=True) for _ in range(num_requests)]
    return {c.worker_id for c in completions}


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_scaling_the_decode_pool_adds_a_serving_actor_and_removes_it(ray_cluster) -> None:
    connector = LauncherConnector(ray_cluster.workers, roles=("decode",))
    assert ray_cluster.worker_ids == ["decode-0"] and await connector.get_replicas("decode") == 1
    assert named_actors() == {"kvweave-decode-0"}

    await connector.set_replicas("decode", 2)
    assert ray_cluster.worker_roles == {"decode-0": "decode", "decode-1": "decode"}
    assert await connector.get_replicas("decode") == 2
    assert named_actors() == {"kvweave-decode-0", "kvweave-decode-1"}
    # more starts while the first still loads (as the launcher's watcher calls it) join that one
    actor = ray_cluster.workers.actors[ray_cluster.worker_ids.index("decode-1")]
    first, second = await asyncio.gather(actor.start.remote(), actor.start.remote())
    assert first == second and first[0] == "decode-1"
    await wait_for(lambda: _eq(registered(ray_cluster), {"decode-0", "decode-1"}), "decode-1 registers")
    assert (await registered_addresses(ray_cluster))["decode-1"] == first[1]

    async def both_serve() -> bool:  # round robin: once the router sees decode-1, two requests reach both
        return await served_by(ray_cluster, 2) == {"decode-0", "decode-1"}

    await wait_for(both_serve, "the router sends requests to decode-1", timeout=120)

    await connector.set_replicas("decode", 1)  # returns once the worker stopped and its actor is gone
    assert ray_cluster.worker_roles == {"decode-0": "decode"} and await connector.get_replicas("decode") == 1
    assert await registered(ray_cluster) == {"decode-0"}  # deregistered (its lease would last 10 s more)
    assert named_actors() == {"kvweave-decode-0"}
    await wait_for(lambda: _eq(served_by(ray_cluster, 2), {"decode-0"}), "the router forgets decode-1", 60)


@pytest.mark.asyncio
async def test_a_negative_count_or_a_pool_not_scaled_is_a_connector_error(ray_cluster) -> None:
    connector = LauncherConnector(ray_cluster.workers, roles=("decode",))
    with pytest.raises(ConnectorError, match="cannot scale the decode pool to -1 replicas: the count must be >= 0"):
        await connector.set_replicas("decode", -1)
    with pytest.raises(ConnectorError, match="the 'prefill' pool is not scaled by this connector; its pools: decode"):
        await connector.set_replicas("prefill", 1)
    with pytest.raises(ConnectorError, match="the 'encode' pool is not scaled"):
        await connector.get_replicas("encode")
    assert ray_cluster.worker_ids == ["decode-0"] and named_actors() == {"kvweave-decode-0"}


@pytest.mark.asyncio
async def test_an_actor_ray_refuses_is_a_connector_error_and_leaves_no_trace(ray_cluster) -> None:
    import ray

    class Squatter:  # holds the name the next decode worker's actor would take
        pass

    squatter = ray.remote(num_cpus=0)(Squatter).options(name="kvweave-decode-1", namespace=NAMESPACE).remote()
    connector = LauncherConnector(ray_cluster.workers, roles=("decode",))
    try:
        with pytest.raises(ConnectorError, match="cannot add a decode worker: Ray refused the actor of worker "
                                                 "decode-1: .*already"):
            await connector.set_replicas("decode", 2)
        assert ray_cluster.worker_roles == {"decode-0": "decode"} and await connector.get_replicas("decode") == 1
    finally:
        ray.kill(squatter)
    eventually(lambda: named_actors() == {"kvweave-decode-0"}, "the squatter's name is free")


def run_planner_once(cluster: LocalCluster, *extra: str) -> list[str]:
    """`kvweave planner --connector ray --once` as its own process, attached to the cluster's Ray; its
    decisions, sorted."""
    import ray

    argv = ["planner", "--connector", "ray", "--ray-address", ray.get_runtime_context().gcs_address,
            "--ray-namespace", NAMESPACE, "--redis-url", cluster.redis_url, "--model", cluster.config.model,
            "--min-replicas", "1", "--interval-s", "0.5", "--metrics-port", "-1", "--once", *extra]
    proc = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(line.split(" (")[0] for line in proc.stdout.splitlines())


def test_a_planner_process_adds_actors_that_outlive_it_and_a_new_planner_adopts_them(ray_cluster) -> None:
    import ray

    # it counts the cluster's decode worker and brings the empty prefill pool to its minimum, then exits
    assert run_planner_once(ray_cluster) == ["decode: 1 -> 1", "prefill: 0 -> 1"]
    [added] = named_actors() - {"kvweave-decode-0"}  # a detached actor: it stays
    assert added.startswith("kvweave-prefill-0-")  # ids are made unique in a Redis the planner shares
    asyncio.run(wait_for(lambda: _eq(registered(ray_cluster), {"decode-0", added.removeprefix("kvweave-")}),
                         "the worker the planner started registers after the planner exited"))
    assert run_planner_once(ray_cluster, "--dry-run") == ["decode: 1 -> 1", "prefill: 1 -> 1"]  # adopted
    assert ray_cluster.worker_ids == ["decode-0"]  # the cluster's own launcher does not take it in
    actor = ray.get_actor(added, namespace=NAMESPACE)
    ray.get(actor.stop.remote(), timeout=60)  # as a planner scaling down would: it deregisters, then goes
    ray.kill(actor)
    eventually(lambda: named_actors() == {"kvweave-decode-0"}, "the prefill worker's actor is gone")
    assert asyncio.run(registered(ray_cluster)) == {"decode-0"}
    assert served_by_sync(ray_cluster) == "decode-0"


def test_adopted_actors_count_lend_their_settings_and_outlive_the_adopter(ray_cluster) -> None:
    """What the separate planner does, in-process (last: it takes the cluster's decode-0 away)."""
    import ray

    from controlplane.cluster_config import ClusterConfig
    from controlplane.ray_launcher import RayWorkers
    from worker.ray_actor import WorkerActor

    config = ClusterConfig(workers=1, launcher="ray", ray_namespace=NAMESPACE, cpus_per_worker=0.5)
    planner_workers = RayWorkers(config, {}, ray_cluster.redis_url, WorkerActor)  # as a planner's, no engine args
    assert planner_workers.adopt() == ["decode-0"] and planner_workers.roles == {"decode-0": "decode"}
    added = planner_workers.add("prefill")
    assert added == "prefill-0" and named_actors() == {"kvweave-decode-0", "kvweave-prefill-0"}
    actor = planner_workers.actors[planner_workers.worker_ids.index(added)]
    engine_args, options = ray.get(actor.settings.remote())
    assert engine_args == {"model": ray_cluster.config.model, **ENGINE_ARGS}  # decode-0's, not the defaults
    assert (options["worker_id"], options["role"]) == ("prefill-0", "prefill")

    planner_workers.remove(["decode-0"])  # the cluster's own launcher sees its actor gone and forgets it
    assert named_actors() == {"kvweave-prefill-0"}
    eventually(lambda: ray_cluster.worker_ids == [], "the cluster's watcher forgets decode-0")
    assert "decode-0" not in asyncio.run(registered(ray_cluster))

    planner_workers.stop()  # stops what it started; Ray stays (the cluster started it)
    assert ray.is_initialized()
    eventually(lambda: named_actors() == set(), "prefill-0's actor is gone")


def served_by_sync(cluster: LocalCluster) -> str:
    with kvweave.Client(cluster.grpc_target, timeout=120) as client:
        return client.complete("Hello", max_tokens=2, ignore_eos=True).worker_id


async def _eq(coro, expected) -> bool:
    return await coro == expected
