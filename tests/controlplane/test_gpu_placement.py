"""GPU placement of local workers: which CUDA_VISIBLE_DEVICES each worker process gets. No GPU runs
here: the machine's GPUs are read from a folder of device nodes the test makes (as /dev holds
nvidia0, nvidia1, ... on a GPU machine, beside nvidiactl and nvidia-uvm, which are not GPUs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.cluster import LocalWorkers
from controlplane.cluster_config import ClusterConfig, ClusterError
from controlplane.gpu_placement import assign_gpus, gpus_for_new_worker, visible_gpus


def test_visible_gpus_named_inherited_or_found(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm", "null"):
        (tmp_path / name).touch()
    assert visible_gpus(None, {}, str(tmp_path)) == ["0", "1", "10"]
    assert visible_gpus(None, {"CUDA_VISIBLE_DEVICES": "2,3"}, str(tmp_path)) == ["2", "3"]
    assert visible_gpus("4, 5", {"CUDA_VISIBLE_DEVICES": "2"}, str(tmp_path)) == ["4", "5"]
    assert visible_gpus("", {}, str(tmp_path)) == []  # none: the workers run on the CPU
    assert visible_gpus(None, {}, str(tmp_path / "missing")) == []
    with pytest.raises(ClusterError, match="twice"):
        visible_gpus("1,1", {})


def test_one_gpu_each_groups_and_shares() -> None:
    w = [f"w{i}" for i in range(4)]
    assert assign_gpus(w, ["0", "1", "2", "3"], 0) == {"w0": "0", "w1": "1", "w2": "2", "w3": "3"}
    assert assign_gpus(w, ["0", "1"], 0) == {"w0": "0", "w1": "1", "w2": "0", "w3": "1"}  # round robin
    assert assign_gpus(w[:2], ["0", "1", "2", "3"], 2) == {"w0": "0,1", "w1": "2,3"}  # TP groups
    assert assign_gpus(w, ["6", "7"], 0.5) == {"w0": "6", "w1": "6", "w2": "7", "w3": "7"}
    assert assign_gpus(w, [], 1) == {}  # no GPU: nothing set


@pytest.mark.parametrize("gpus, per_worker, message", [
    (["0", "1", "2"], 2, "need 8 GPUs; 3 visible"),
    (["0"], 0.5, "need 2 GPUs; 1 visible"),
    (["0", "1", "2", "3"], 0.3, "1/n"),
    (["0", "1", "2", "3"], 1.5, "whole number"),
])
def test_impossible_placements_are_refused(gpus, per_worker, message) -> None:
    with pytest.raises(ClusterError, match=message):
        assign_gpus([f"w{i}" for i in range(4)], gpus, per_worker)


def test_local_workers_get_their_gpus(tmp_path: Path) -> None:
    config = ClusterConfig(workers=2, decode_workers=1, gpus="4,5,6")
    roles = {"worker-0": "colocated", "worker-1": "colocated", "decode-0": "decode"}
    workers = LocalWorkers(config, roles, "redis://127.0.0.1:1", tmp_path, {"PATH": "/bin"})
    assert workers.gpus == {"worker-0": "4", "worker-1": "5", "decode-0": "6"}
    none = LocalWorkers(ClusterConfig(workers=1, gpus=""), {"worker-0": "colocated"}, "redis://127.0.0.1:1",
                        tmp_path, {"PATH": "/bin"})
    assert none.gpus == {}


def test_a_worker_added_later_gets_gpus_as_the_others_were_shared() -> None:
    """The planner's local connector adds workers one at a time: each gets the least used GPU,
    room on a shared one, or unused ones for a group; none when the machine has no GPU."""
    gpus = ["0", "1", "2", "3"]
    assert gpus_for_new_worker({"w0": "0", "w1": "1"}, gpus, 0) == "2"
    assert gpus_for_new_worker({f"w{i}": g for i, g in enumerate(gpus)}, gpus, 0) == "0"  # all used once
    assert gpus_for_new_worker({"w0": "0,1"}, gpus, 2) == "2,3"
    assert gpus_for_new_worker({"w0": "0", "w1": "0"}, ["0", "1"], 0.5) == "1"
    assert gpus_for_new_worker({}, [], 1) is None
    with pytest.raises(ClusterError, match="needs 2 unused GPUs; 1 of 4"):
        gpus_for_new_worker({"w0": "0,1", "w1": "2"}, gpus, 2)
    with pytest.raises(ClusterError, match="no GPU has room"):
        gpus_for_new_worker({"w0": "0", "w1": "0"}, ["0"], 0.5)


def test_a_tensor_parallel_worker_gets_a_gpu_and_a_cpu_per_rank(tmp_path) -> None:
    config = ClusterConfig(workers=2, gpus="0,1,2,3", engine_args={"tensor_parallel_size": 2})
    assert (config.worker_gpus, config.worker_cpus) == (2.0, 2.0)
    workers = LocalWorkers(config, {"worker-0": "colocated", "worker-1": "colocated"}, "redis://127.0.0.1:1",
                           tmp_path, {"PATH": "/bin"})
    assert workers.gpus == {"worker-0": "0,1", "worker-1": "2,3"}
    explicit = ClusterConfig(workers=1, gpus_per_worker=4, cpus_per_worker=3, engine_args={"tensor_parallel_size": 2})
    assert (explicit.worker_gpus, explicit.worker_cpus) == (4.0, 3.0)
    assert (ClusterConfig(workers=1).worker_gpus, ClusterConfig(workers=1).worker_cpus) == (0.0, 1.0)
