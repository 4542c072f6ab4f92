"""Which GPUs each local worker process sees (`CUDA_VISIBLE_DEVICES`), as vLLM and Dynamo place one
engine per GPU (or per group of GPUs for tensor parallelism). Ray places its actors itself from
their `num_gpus` reservation; this is for `kvweave serve`'s local processes.

The GPUs to share out are the ones named (`--gpus 0,1,2,3`), else those this process was given
(its own CUDA_VISIBLE_DEVICES), else every /dev/nvidiaN of the machine. No torch here: the control
plane does not import it."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from controlplane.cluster_config import ClusterError


def visible_gpus(spec: str | None, env: Mapping[str, str], dev_dir: str = "/dev") -> list[str]:
    """The GPU ids to share out among the workers (empty: no GPU, the workers run on the CPU)."""
    if spec is None:
        spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        try:
            names = os.listdir(dev_dir)
        except OSError:
            return []
        return sorted((m.group(1) for n in names if (m := re.fullmatch(r"nvidia(\d+)", n))), key=int)
    ids = [g.strip() for g in spec.split(",") if g.strip()]
    if len(set(ids)) != len(ids):
        raise ClusterError(f"GPU ids {spec!r} name a GPU twice")
    return ids


def assign_gpus(worker_ids: list[str], gpus: list[str], per_worker: float) -> dict[str, str]:
    """worker id -> its CUDA_VISIBLE_DEVICES. `per_worker` 0: one GPU each (workers beyond the GPUs
    share them, round robin); k >= 1 (whole): k GPUs each, none shared; 0 < k < 1: 1/k workers per
    GPU. No GPUs: no assignment."""
    if not gpus or not worker_ids:
        return {}
    if per_worker == 0:
        return {w: gpus[i % len(gpus)] for i, w in enumerate(worker_ids)}
    if per_worker < 1:
        share = round(1 / per_worker)
        if abs(share * per_worker - 1) > 1e-9:
            raise ClusterError(f"gpus_per_worker {per_worker}: below 1 it must be 1/n (0.5, 0.25, ...)")
        need = -(-len(worker_ids) // share)
        if need > len(gpus):
            raise ClusterError(f"{len(worker_ids)} workers at {per_worker} GPU each need {need} GPUs; "
                               f"{len(gpus)} visible ({','.join(gpus)})")
        return {w: gpus[i // share] for i, w in enumerate(worker_ids)}
    if per_worker != int(per_worker):
        raise ClusterError(f"gpus_per_worker {per_worker}: from 1 up it must be a whole number")
    k = int(per_worker)
    if k * len(worker_ids) > len(gpus):
        raise ClusterError(f"{len(worker_ids)} workers x {k} GPUs need {k * len(worker_ids)} GPUs; "
                           f"{len(gpus)} visible ({','.join(gpus)})")
    return {w: ",".join(gpus[i * k:(i + 1) * k]) for i, w in enumerate(worker_ids)}


def gpus_for_new_worker(assigned: Mapping[str, str], gpus: list[str], per_worker: float) -> str | None:
    """CUDA_VISIBLE_DEVICES of one more worker beside those `assigned` (worker id -> theirs), as
    `assign_gpus` would share them: the least used GPU (0), a GPU with room left (1/n), or k unused
    GPUs (k). None when there are no GPUs."""
    if not gpus:
        return None
    load = {g: 0 for g in gpus}
    for value in assigned.values():
        for g in value.split(","):
            if g in load:
                load[g] += 1
    least = min(gpus, key=lambda g: (load[g], gpus.index(g)))
    if per_worker == 0:
        return least
    if per_worker < 1:
        share = round(1 / per_worker)
        if load[least] >= share:
            raise ClusterError(f"no GPU has room for another worker at {per_worker} GPU each "
                               f"({len(gpus)} visible, {len(assigned)} workers)")
        return least
    k = int(per_worker)
    free = [g for g in gpus if load[g] == 0]
    if len(free) < k:
        raise ClusterError(f"another worker needs {k} unused GPUs; {len(free)} of {len(gpus)} are unused")
    return ",".join(free[:k])
