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
created with), so the worker comes back with its id; one whose actor is gone for good (killed, or out
of restarts) is forgotten. kvweave must be importable on the Ray nodes (installed, or shipped with a
runtime_env in `ray.init` by whoever connects).

Each actor is named `kvweave-<worker id>` (`kvweave-decode-1`) in the cluster's Ray namespace
(`ray_namespace`), so another driver finds them: the planner's ray connector scales the pools with
`add` (one more actor of a role, started as `start` starts them) and `remove` (the worker deregisters
and drains, then the actor is killed), and `adopt`s the actors `kvweave serve` started. The planner's
actors are detached (`detached`): they outlive the planner's process, and the next planner adopts them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from controlplane.cluster_config import (ID_PREFIXES, ClusterConfig, ClusterError, heartbeat_s, next_worker_id,
                                        shared_engine_args, worker_engine_args)
from kvweave.registry import NODE_IP

logger = logging.getLogger(__name__)

ACTOR_PREFIX = "kvweave-"
"""Worker actors are named ACTOR_PREFIX + worker id (`actor_name`)."""
STOP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 600.0
"""How long a worker actor may take to load its model and serve."""
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


def _listens(host: str, port: str) -> bool:
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError):
        return False
    return True


def _connect_options(address: str) -> contextlib.AbstractContextManager:
    """How to connect to the Ray cluster at `address`. Raises RayStartError when nothing listens at a
    host:port address (Ray would retry for long). A loopback-only cluster (as the local one started
    here) is reached within `_loopback_only`: Ray replaces a loopback host by this machine's IP
    before connecting, and finds nothing there."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():  # "auto", ray://...: Ray's own
        return contextlib.nullcontext()
    if not _listens(host, port):
        raise RayStartError(f"cannot connect to Ray at {address}: nothing listens there")
    import ray

    loopback = host.strip("[]") in ("127.0.0.1", "localhost", "::1")
    return _loopback_only() if loopback and not _listens(ray.util.get_node_ip_address(), port) \
        else contextlib.nullcontext()


class RayWorkers:
    """N actors of `actor_cls` in a Ray cluster (a local one unless `config.ray_address`); `roles`: worker
    id -> its role.

    `actor_cls` has async `start(engine_args: dict, options: dict) -> (worker id, address)` (load the
    model, serve, register), `stop()`, `settings() -> (engine_args, options)` and `pid()`:
    `worker.ray_actor.WorkerActor`. `options` are `worker.server.WorkerOptions` fields; an
    `advertise_host` of `kvweave.registry.NODE_IP` asks the actor to advertise its node's IP."""

    def __init__(self, config: ClusterConfig, roles: dict[str, str], redis_url: str, actor_cls: type,
                 security_env: dict[str, str] | None = None, detached: bool = False) -> None:
        """`security_env`: the cluster's KVWEAVE_CLUSTER_SECRET_FILE / KVWEAVE_REDIS_PASSWORD_FILE; the
        files' contents go to each actor in its `start` call (actors on other nodes cannot read
        them), which writes them to private files of its own. `detached`: the actors this creates
        outlive this driver (Ray's detached lifetime) and `stop` leaves them serving, for a later
        driver to `adopt` (the planner's); unless this started the Ray cluster itself, which stops
        with it."""
        self.config, self.roles, self.redis_url = config, roles, redis_url
        self.detached = detached
        self.security_env = security_env or {}
        self.worker_ids = list(roles)
        self.actor_cls = actor_cls
        self.addresses: dict[str, str] = {}
        self._actors: dict[str, Any] = {}
        """worker id -> its actor's handle."""
        self._refs: dict[str, Any] = {}
        """worker id -> the ref of its actor's first `start`."""
        self._remote_cls = None
        self._engine_args = {"model": config.model, **config.engine_args}
        """Engine settings of the actors this creates (`adopt` takes those of the actors it finds)."""
        self._adopted: set[str] = set()
        """Workers whose actors another driver created (`adopt`): `stop` leaves them running."""
        self._lock = threading.Lock()
        """Guards the tables `add` and `remove` change while the watcher reads them."""
        self._started_ray = False
        self._own_ray = False
        """This driver started the (local) Ray cluster: it goes, with every actor, at `stop`."""
        self._failure: str | None = None
        self.restarts: dict[str, int] = dict.fromkeys(self.worker_ids, 0)
        """Workers the watcher started again after Ray re-created their actor."""
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def actors(self) -> list:
        """The actors' handles, in the order of `worker_ids`."""
        return [self._actors[i] for i in self.worker_ids if i in self._actors]

    def _init_ray(self) -> None:
        import ray

        c = self.config
        if ray.is_initialized():
            return
        try:
            if c.ray_address:
                with _connect_options(c.ray_address):
                    ray.init(address=c.ray_address, logging_level=logging.WARNING)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                num_cpus = max(os.cpu_count() or 1, math.ceil(c.num_workers * c.worker_cpus))
                with _loopback_only():
                    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                             _temp_dir=c.ray_temp_dir, logging_level=logging.WARNING, log_to_driver=False)
                self._own_ray = True
        except RayStartError:
            raise
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
        self._init_ray()
        for worker_id in self.worker_ids:
            self._create(worker_id)

    def _create(self, worker_id: str) -> None:
        """Create the actor of `worker_id`, named `actor_name(worker_id)` in the cluster's Ray namespace,
        and start its worker."""
        import ray

        c = self.config
        if self._remote_cls is None:
            max_restarts = (c.max_restarts or -1) if c.restart else 0  # Ray: -1 restarts without end
            self._remote_cls = ray.remote(num_cpus=c.worker_cpus, num_gpus=c.gpus_per_worker,
                                          max_restarts=max_restarts)(self.actor_cls)
        engine_args = worker_engine_args(self._engine_args, worker_id, self.roles[worker_id])
        lifetime = "detached" if self.detached else None
        actor = self._remote_cls.options(name=actor_name(worker_id), namespace=c.ray_namespace,
                                         lifetime=lifetime).remote(
            engine_args, self._worker_options(worker_id), self._secrets())
        with self._lock:
            self._actors[worker_id] = actor
            self._refs[worker_id] = actor.start.remote()

    def add(self, role: str) -> str:
        """Create one more actor of `role` (the next free index) and start its worker; returns its id.
        Raises ValueError for an unknown role, ClusterError when Ray refuses the actor."""
        worker_id = next_worker_id(self.config, self.roles, role)
        self._init_ray()
        with self._lock:
            self.roles[worker_id] = role
            self.worker_ids.append(worker_id)
            self.restarts[worker_id] = 0
        try:
            self._create(worker_id)
        except Exception as e:  # its name taken, Ray unreachable, ...
            with self._lock:
                self.worker_ids.remove(worker_id)
                del self.roles[worker_id], self.restarts[worker_id]
            raise ClusterError(f"Ray refused the actor of worker {worker_id}: {e}") from e
        return worker_id

    def remove(self, worker_ids: list[str]) -> None:
        """Stop these workers (each deregisters and drains, as on SIGTERM), kill their actors and forget them."""
        self._stop_actors(self._forget(worker_ids))
        self._wait_names_free([actor_name(w) for w in worker_ids])

    def adopt(self) -> list[str]:
        """Take in the worker actors another driver created in the cluster's Ray namespace (`kvweave serve
        --launcher ray`, another planner), so that they count and `remove` may stop them; `stop` leaves
        them running; the actors `add` creates from now on get their engine settings (model included).
        Each is asked to `start` (a no-op on a serving one), so one whose driver exited before its start
        ran serves too. Returns their ids."""
        import ray

        self._init_ray()
        prefixes = {prefix: role for role, prefix in ID_PREFIXES.items()}
        found = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name, worker_id = entry["name"], entry["name"].removeprefix(ACTOR_PREFIX)
            role = prefixes.get(worker_id.split("-")[0])
            if entry["namespace"] != self.config.ray_namespace or name == worker_id or role is None \
                    or worker_id in self.roles:
                continue
            try:
                actor = ray.get_actor(name, namespace=self.config.ray_namespace)
            except ValueError:  # gone meanwhile
                continue
            with self._lock:
                self._actors[worker_id], self.roles[worker_id] = actor, role
                self.worker_ids.append(worker_id)
                self._adopted.add(worker_id)
                # a no-op on a serving actor; it starts one whose driver left before its start ran
                self._refs[worker_id] = actor.start.remote()
            found.append(worker_id)
        if found:
            engine_args, _ = ray.get(self._actors[found[0]].settings.remote(), timeout=STOP_TIMEOUT_S)
            self._engine_args = shared_engine_args(engine_args, found[0])
        return found

    def _gone(self, worker_id: str) -> bool:
        """Whether the actor's name is free: Ray will not bring it back (killed, by a planner that removed
        it or by hand, or out of restarts)."""
        import ray

        try:
            ray.get_actor(actor_name(worker_id), namespace=self.config.ray_namespace)
        except ValueError:
            return True
        return False

    def _forget(self, worker_ids: list[str]) -> list:
        """Drop these workers from every table; returns their actors."""
        with self._lock:
            worker_ids = [w for w in worker_ids if w in self._actors]  # the watcher may have forgotten one
            actors = [self._actors.pop(w) for w in worker_ids]
            for worker_id in worker_ids:
                self.worker_ids.remove(worker_id)
                self._adopted.discard(worker_id)
                for table in (self.roles, self.addresses, self._refs, self.restarts):
                    table.pop(worker_id, None)
        return actors

    def watch(self) -> None:
        """Start the watcher thread that starts again the workers of actors Ray re-created (not those of
        adopted actors)."""
        if self.config.restart and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="kvweave-ray-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        import ray

        addresses = dict(self.addresses)
        while not self._watching.wait(WATCH_S):
            with self._lock:  # the adopted actors are their own launcher's to watch
                actors = {i: a for i, a in self._actors.items() if i not in self._adopted}
            for worker_id, actor in actors.items():
                try:
                    _, address = ray.get(actor.start.remote(), timeout=START_TIMEOUT_S)
                except Exception as e:  # restarting, out of restarts, killed, or its worker failed to start
                    if worker_id not in self._actors:  # removed meanwhile
                        continue
                    if isinstance(e, ray.exceptions.ActorDiedError) and self._gone(worker_id):
                        logger.warning("Ray worker %s is gone for good, forgotten: %s", worker_id, e)
                        self._forget([worker_id])
                    else:
                        logger.warning("Ray worker %s is not serving: %s", worker_id, e)
                    continue
                with self._lock:
                    if worker_id not in self._actors:  # removed meanwhile
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
        with self._lock:
            refs = dict(self._refs)
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        for worker_id, ref in refs.items():
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
        with self._lock:
            leave = self._adopted if self._own_ray or not self.detached else set(self._actors)
            actors = [a for i, a in self._actors.items() if i not in leave]
            starting = [ref for i, ref in self._refs.items() if i in leave and i not in self._adopted]
            self._actors = {}
        if starting:  # a start still running when its driver exits is dropped: the actor would never serve
            _, pending = ray.wait(starting, num_returns=len(starting), timeout=START_TIMEOUT_S)
            if pending:
                logger.warning("%d detached worker actor(s) still starting after %.0f s are left as they are",
                               len(pending), START_TIMEOUT_S)
        self._stop_actors(actors)
        if self._started_ray:
            ray.shutdown()
            self._started_ray = self._own_ray = False

    @staticmethod
    def _stop_actors(actors: list) -> None:
        """Stop the actors' workers (deregister, drain; at most STOP_TIMEOUT_S), then kill the actors."""
        import ray

        stops = [actor.stop.remote() for actor in actors]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        except Exception as e:  # an actor that already died
            logger.warning("stopping Ray workers: %s", e)
        for actor in actors:
            ray.kill(actor)

    def _wait_names_free(self, names: list[str]) -> None:
        """Wait (at most STOP_TIMEOUT_S) until Ray has released the names of killed actors, so that a worker
        added next with the same index can take its name."""
        import ray

        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=self.config.ray_namespace)
                except ValueError:  # no such actor (any more)
                    break
                time.sleep(0.1)


def actor_name(worker_id: str) -> str:
    """The Ray name of a worker's actor (in the cluster's `ray_namespace`)."""
    return f"{ACTOR_PREFIX}{worker_id}"
