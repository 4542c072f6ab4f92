"""The Ray launcher on a real local Ray cluster (127.0.0.1, token auth off, temp dir under the test's
folder): a tiny worker runs as a Ray actor, registers in Redis, and serves through the router.

Ray starts slowly, so the module shares one cluster; it skips when Ray cannot start here. The
options each actor gets (its role among them) are checked without Ray.
"""
from __future__ import annotations

import os
import time
import urllib.request

import pytest

import kvweave
from controlplane.cluster import LocalCluster
from controlplane.cluster_config import ClusterConfig, worker_roles
from controlplane.procs import pid_alive

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "num_threads": 1}


@pytest.fixture(scope="module")
def ray_cluster(tiny_hf_model, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from controlplane.ray_launcher import RayStartError
    from worker.ray_actor import WorkerActor

    assert not ray.is_initialized()
    cluster = LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, launcher="ray",
                           ray_actor=WorkerActor,
                           ray_temp_dir=str(tmp_path_factory.mktemp("ray")), startup_timeout=240)
    try:
        cluster.start()
    except RayStartError as e:
        pytest.skip(f"Ray cannot start here: {e}")
    yield cluster
    cluster.stop()


def actor_pids(cluster: LocalCluster) -> list[int]:
    import ray

    return ray.get([actor.pid.remote() for actor in cluster.workers.actors])


def test_ray_actor_worker_serves_through_the_router(ray_cluster) -> None:
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"  # the local Ray cluster stays on loopback
    (pid,) = actor_pids(ray_cluster)
    assert pid != os.getpid() and pid not in ray_cluster.pids()  # a Ray worker process, not ours
    assert len(ray_cluster.pids()) == 2  # only Redis and the router are local children
    (worker_id,) = ray_cluster.worker_ids
    assert ray_cluster.worker_addresses[worker_id].startswith("127.0.0.1:")
    metrics_url = ray_cluster.metrics_urls[worker_id]  # the port the actor's worker registered
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        assert metrics_url.startswith("http://127.0.0.1:") and b"kvweave_worker_info" in resp.read()
    with kvweave.Client(ray_cluster.grpc_target, timeout=60) as client:
        completion = client.complete("Hello", max_tokens=3, ignore_eos=True)
    assert (completion.worker_id, completion.usage.completion_tokens) == (worker_id, 3)


def test_stop_shuts_down_the_actors_and_ray(ray_cluster) -> None:
    import ray

    pids = actor_pids(ray_cluster)
    ray_cluster.stop()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30  # Ray reaps its worker processes asynchronously
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if pid_alive(p)]


def test_each_actor_gets_its_role_in_valid_worker_options() -> None:
    from controlplane.ray_launcher import RayWorkers
    from worker.server import WorkerOptions

    config = ClusterConfig(workers=1, prefill_workers=1, decode_workers=1, launcher="ray")
    workers = RayWorkers(config, worker_roles(config), "redis://127.0.0.1:1/0", object)
    options = {i: WorkerOptions(**workers._worker_options(i)) for i in workers.worker_ids}
    assert {i: (o.worker_id, o.role) for i, o in options.items()} == {
        "worker-0": ("worker-0", "colocated"), "prefill-0": ("prefill-0", "prefill"), "decode-0": ("decode-0", "decode")}
