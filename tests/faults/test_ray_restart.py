"""A Ray worker actor whose process is SIGKILLed is re-created by Ray (`max_restarts`) and started
again by the launcher's watcher with its id; it registers again and serves through the router."""
from __future__ import annotations

import os
import signal

import pytest

import kvweave
from controlplane.cluster import LocalCluster
from tests.faults.conftest import ENGINE, wait_until


def test_killed_ray_worker_is_restarted_and_serves(fault_model, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from controlplane.ray_launcher import RayStartError
    from worker.ray_actor import WorkerActor

    assert not ray.is_initialized()
    cluster = LocalCluster(workers=1, model=fault_model, engine_args=ENGINE, launcher="ray", ray_actor=WorkerActor,
                           ray_temp_dir=str(tmp_path_factory.mktemp("ray")), lease_s=2.0, startup_timeout=240)
    try:
        try:
            cluster.start()
        except RayStartError as e:
            pytest.skip(f"Ray cannot start here: {e}")
        (worker_id,) = cluster.worker_ids
        (actor,) = cluster.workers.actors
        old_pid, old_address = ray.get(actor.pid.remote()), cluster.worker_addresses[worker_id]
        os.kill(old_pid, signal.SIGKILL)
        wait_until("the Ray worker serves again", lambda: cluster.restarts[worker_id] == 1, 180, step=0.5)
        assert ray.get(actor.pid.remote()) != old_pid
        assert cluster.worker_addresses[worker_id] != old_address  # a new process on a new port

        def served() -> bool:
            try:
                with kvweave.Client(cluster.grpc_target, timeout=30) as client:
                    completion = client.complete("Hello", max_tokens=3, ignore_eos=True)
            except kvweave.KVWeaveError:
                return False
            return completion.worker_id == worker_id

        wait_until("the router served through the restarted worker", served, 60, step=0.5)
    finally:
        cluster.stop()
