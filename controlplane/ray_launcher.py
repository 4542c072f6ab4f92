"""Workers as Ray actors: each actor runs one worker in its own process and registers in the cluster's
Redis like any worker, so the router needs nothing Ray-specific. The actor class comes from the
caller (`worker.ray_actor.WorkerActor`, passed down by the `kvweave serve` command): it gets the
engine settings and the worker options as plain dicts, and the control plane never imports the
worker.

With `ray_address` the actors go to that Ray cluster (each reserving `gpus_per_worker` GPUs, so Ray
places them on GPU nodes and sets CUDA_VISIBLE_DEVICES); they bind all interfaces and advertise
their node's IP. Without it a local Ray cluster is started on 127.0.0.1 (no dashboard, token
authentication disabled, `ray_temp_dir` as its temp dir) and shut down on `stop`; there the
actors bind `host`. Restarts (with `config.restart`): each actor is created with `max_restarts`, so
Ray re-creates one whose process died, and a watcher thread (`watch`) calls `start` on every actor
every few seconds (a no-op on a serving actor; it starts a re-created one with the settings it was
created with), so the worker comes back with its id. kvweave must be importable on the Ray nodes (installed, or shipped with a
runtime_env in `ray.init` by whoever connects).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

from controlplane.cluster_config import ClusterConfig, ClusterError, heartbeat_s, worker_engine_args
from kvweave.registry import NODE_IP

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
WATCH_S = 2.0
"""How often the watcher makes sure every actor serves (after Ray restarted one)."""
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayStartError(ClusterError):
    """Ray could not start or connect (so no worker was created)."""


@contextlib.contextmanager
def _loopback_only():
    """Keep a local Ray cluster on 127.0.0.1.

    On Linux, Ray replaces a loopback `_node_ip_address` by the machine's routable IP and its GCS,
    raylet and workers listen on all interfaces, with authentication disabled here. Ray keeps to
    loopback where it believes multi-node clusters are unsupported: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    (read when ray is imported, hence also the constant). Only the start needs it; both are restored.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = saved_env


class RayWorkers:
    """N actors of `actor_cls` in a Ray cluster (a local one unless `config.ray_address`); `roles`: worker
    id -> its role.

    `actor_cls` has async `start(engine_args: dict, options: dict) -> (worker id, address)` (load the
    model, serve, register), `stop()` and `pid()`: `worker.ray_actor.WorkerActor`. `options` are
    `worker.server.WorkerOptions` fields; an `advertise_host` of `kvweave.registry.NODE_IP` asks the
    actor to advertise its node's IP."""

    def __init__(self, config: ClusterConfig, roles: dict[str, str], redis_url: str, actor_cls: type,
                 security_env: dict[str, str] | None = None) -> None:
        """`security_env`: the cluster's KVWEAVE_CLUSTER_SECRET_FILE / KVWEAVE_REDIS_PASSWORD_FILE; the
        files' contents go to each actor in its `start` call (actors on other nodes cannot read
        them), which writes them to private files of its own."""
        self.config, self.roles, self.redis_url = config, roles, redis_url
        self.security_env = security_env or {}
        self.worker_ids = list(roles)
        self.actor_cls = actor_cls
        self.addresses: dict[str, str] = {}
        self.actors: list = []
        self._started_ray = False
        self._failure: str | None = None
        self._refs: list = []
        self.restarts: dict[str, int] = dict.fromkeys(self.worker_ids, 0)
        """Workers the watcher started again after Ray re-created their actor."""
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def _init_ray(self) -> None:
        import ray

        c = self.config
        if ray.is_initialized():
            return
        try:
            if c.ray_address:
                ray.init(address=c.ray_address, logging_level=logging.WARNING)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                num_cpus = max(os.cpu_count() or 1, math.ceil(c.num_workers * c.cpus_per_worker))
                with _loopback_only():
                    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                             _temp_dir=c.ray_temp_dir, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
            raise RayStartError(f"cannot start Ray{' at ' + c.ray_address if c.ray_address else ''}: {e}") from e
        self._started_ray = True

    def _worker_options(self, worker_id: str) -> dict[str, Any]:
        c = self.config
        remote = bool(c.ray_address)
        options = {"host": "0.0.0.0" if remote else c.host, "port": 0, "redis_url": self.redis_url,
                   "worker_id": worker_id, "role": self.roles[worker_id],
                   "advertise_host": NODE_IP if remote else None, "peer_fetch": c.peer_fetch,
                   "max_waiting": c.max_waiting}
        return options | ({"lease_s": c.lease_s, "heartbeat_s": heartbeat_s(c.lease_s)} if c.lease_s else {})

    def _secrets(self) -> dict[str, str]:
        """Environment variable -> the content of the file it names."""
        return {name: Path(path).read_text() for name, path in self.security_env.items()}

    def start(self) -> None:
        """Create the actors and start their workers; `check` reports a failed start."""
        import ray

        self._init_ray()
        c = self.config
        max_restarts = (c.max_restarts or -1) if c.restart else 0  # Ray: -1 restarts without end
        actor_cls = ray.remote(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker,
                               max_restarts=max_restarts)(self.actor_cls)
        engine_args = {"model": c.model, **c.engine_args}
        for worker_id in self.worker_ids:
            settings = (worker_engine_args(engine_args, worker_id), self._worker_options(worker_id))
            actor = actor_cls.options(name=f"kvweave-{worker_id}").remote(*settings, self._secrets())
            self.actors.append(actor)
            self._refs.append(actor.start.remote())

    def watch(self) -> None:
        """Start the watcher thread that starts again the workers of actors Ray re-created."""
        if self.config.restart and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="kvweave-ray-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        import ray

        addresses = dict(self.addresses)
        while not self._watching.wait(WATCH_S):
            for worker_id, actor in zip(self.worker_ids, self.actors):
                try:
                    _, address = ray.get(actor.start.remote(), timeout=600)
                except Exception as e:  # restarting, given up by Ray, or its worker failed to start
                    logger.warning("Ray worker %s is not serving: %s", worker_id, e)
                    continue
                if address != addresses.get(worker_id):
                    if worker_id in addresses:
                        self.restarts[worker_id] += 1
                        logger.warning("Ray worker %s serves again at %s (its actor was restarted)", worker_id,
                                       address)
                    addresses[worker_id] = self.addresses[worker_id] = address

    def check(self) -> str | None:
        """None while every actor's start is pending or succeeded, else why one failed."""
        import ray

        if self._failure is not None:
            return self._failure
        done, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        for worker_id, ref in zip(self.worker_ids, self._refs):
            if ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # RayActorError, or RayTaskError wrapping the worker's error
                    cause = getattr(e, "cause", None) or e
                    self._failure = f"worker {worker_id} (Ray actor) failed: {type(cause).__name__}: {cause}"
        return self._failure

    def logs(self) -> str:
        return "(Ray worker logs are in the Ray session's logs folder)"

    def stop(self) -> None:
        import ray

        self._watching.set()
        if self._watcher is not None:
            self._watcher.join(timeout=STOP_TIMEOUT_S)
            self._watcher = None
        if not ray.is_initialized():
            return
        stops = [actor.stop.remote() for actor in self.actors]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        except Exception as e:  # an actor that already died
            logger.warning("stopping Ray workers: %s", e)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
