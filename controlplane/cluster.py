"""An embedded kvweave cluster on this machine: Redis, N workers and the router, started and stopped together.

    with LocalCluster(workers=2, model="smollm2-135m") as cluster:
        client = kvweave.Client(cluster.grpc_target)

The workers form up to three pools, colocated, prefill and decode (`ClusterConfig.workers`,
`prefill_workers`, `decode_workers`); each worker is started with its role and registers it.

Workers run as local `kvweave worker` processes (`launcher="local"`) or as Ray actors
(`launcher="ray"`, see `controlplane.ray_launcher`; the caller passes the actor class that runs a
worker, `worker.ray_actor.WorkerActor`, since the control plane never imports the worker); the
router and, when no `redis_url` is given, a private redis-server run as local processes. Every
child runs in its own process group with its output in a log file; `stop` terminates the groups
(SIGTERM, then SIGKILL) so nothing is left behind.

Once the cluster is ready, a `controlplane.supervisor.Supervisor` restarts a local child that dies
(the router, a worker process, the private redis-server) with backoff, with the same command line,
so a worker keeps its id and ports; `restarts` counts them. Ray restarts its worker actors itself
(`max_restarts`, controlplane/ray_launcher.py). `restart=False` turns supervision off.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from controlplane.cluster_config import (
    ClusterConfig, ClusterError, cli_command, field_flags, heartbeat_s, next_worker_id, worker_engine_args,
    worker_roles,
)
from controlplane.procs import (LOCALHOST, RedisServer, child_env, free_port, spawn, stop_process_groups, tail,
                                with_tcmalloc)
from controlplane.gpu_placement import assign_gpus, gpus_for_new_worker, visible_gpus
from controlplane.supervisor import Supervisor
from kvweave import cluster_secret
from kvweave.cpu_affinity import CoreSlots, available_cores, format_cores

logger = logging.getLogger(__name__)

PORT_REBINDS = 3
"""Times the cluster starts its router, and its local workers, on fresh ports after losing the picked
ones while starting (`_rebind_router`, `_rebind_worker`)."""

def run_sync(coro) -> Any:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class LocalCluster:
    """Redis + workers + router on this machine; a context manager. See `ClusterConfig` for the options."""

    def __init__(self, config: ClusterConfig | None = None, *, ray_actor: type | None = None, **options: Any) -> None:
        """`ray_actor`: with launcher="ray", the Ray actor class that runs one worker
        (`worker.ray_actor.WorkerActor`)."""
        self.config = config or ClusterConfig(**options)
        if self.config.launcher == "ray" and ray_actor is None:
            raise ValueError("launcher 'ray' needs ray_actor, the actor class that runs a worker "
                             "(worker.ray_actor.WorkerActor)")
        self.ray_actor = ray_actor
        self.redis: RedisServer | None = None
        self.router: subprocess.Popen | None = None
        self.workers = None  # a LocalWorkers or RayWorkers
        self._log_dir: Path | None = None
        self._own_log_dir = False
        self._worker_metrics_urls: dict[str, str] = {}
        self._router_rebinds = self._worker_rebinds = 0
        self._secret_dir: str | None = None
        self.security_env: dict[str, str] = {}
        """KVWEAVE_CLUSTER_SECRET_FILE / KVWEAVE_REDIS_PASSWORD_FILE -> the files the children use."""
        self.port = self.config.port or free_port()
        self.http_port = self.config.http_port or free_port()
        self.supervisor = Supervisor(self.config.restart_policy)

    # -- endpoints -------------------------------------------------------------------------------

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.router_args.get("tls_cert_file") else "http"
        return f"{scheme}://{self.config.host}:{self.http_port}"

    @property
    def redis_url(self) -> str:
        """The cluster's Redis, with its password when it has one: for clients in this process only
        (show `kvweave.cluster_secret.redact(url)`)."""
        return self._with_password(self._public_redis_url)

    @property
    def _public_redis_url(self) -> str:
        return self.config.redis_url or self.redis.url

    def _with_password(self, url: str) -> str:
        if self.redis is not None:
            return self.redis.client_url
        path = self.security_env.get(cluster_secret.REDIS_PASSWORD_ENV)
        if path is None:
            return url
        return cluster_secret.with_password(url, cluster_secret.read_redis_password(path))

    @property
    def worker_ids(self) -> list[str]:
        return list(self.workers.worker_ids)

    @property
    def worker_roles(self) -> dict[str, str]:
        """worker id -> its role (colocated, prefill, decode)."""
        return dict(self.workers.roles)

    @property
    def worker_addresses(self) -> dict[str, str]:
        """worker id -> host:port of its gRPC service."""
        return dict(self.workers.addresses)

    @property
    def metrics_urls(self) -> dict[str, str]:
        """"router" and each worker id -> the URL of its Prometheus metrics (workers: as registered)."""
        return {"router": f"{self.http_url}/metrics", **self._worker_metrics_urls}

    @property
    def log_dir(self) -> Path:
        return self._log_dir

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far: "router", "redis" and each worker id -> count (Ray workers: the times
        their re-created actor was started again)."""
        return {**self.supervisor.restarts, **getattr(self.workers, "restarts", {})}

    def pids(self) -> list[int]:
        """Every local child process (Redis, router, worker processes)."""
        procs = [self.redis.proc if self.redis else None, self.router, *getattr(self.workers, "procs", [])]
        return [p.pid for p in procs if p is not None]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        """Start everything and wait until ready; on failure stops what started and raises ClusterError."""
        self.supervisor = Supervisor(self.config.restart_policy)  # a fresh one per start
        try:
            self._open_log_dir()
            self._make_security_files()
            if self.config.redis_url is None:
                if self.config.ray_address:
                    logger.warning("the private Redis listens on %s only: Ray workers on other nodes need "
                                   "--redis-url", LOCALHOST)
                password_file = self.security_env.get(cluster_secret.REDIS_PASSWORD_ENV)
                password = cluster_secret.read_redis_password(password_file) if password_file else None
                self.redis = RedisServer(password=password).start()
            self._start_router()
            self.workers = self._make_workers()
            self.workers.start()
            run_sync(self._wait_ready())
            self._supervise()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_router(self) -> subprocess.Popen:
        self.router = spawn(self._router_command(), self._log_dir / "router.log", self._env())
        return self.router

    def _restart_redis(self) -> subprocess.Popen:
        return self.redis.start().proc

    def _supervise(self) -> None:
        """Hand every local child to the supervisor (a worker keeps its id and ports when restarted)."""
        if self.redis is not None:
            self.supervisor.add("redis", self.redis.proc, self._restart_redis)
        self.supervisor.add("router", self.router, self._start_router)
        if isinstance(self.workers, LocalWorkers):
            for worker_id in self.workers.worker_ids:
                self._supervise_worker(worker_id)
        else:
            self.workers.watch()  # Ray re-creates a dead actor; the launcher starts its worker again
        self.supervisor.start()

    def _supervise_worker(self, worker_id: str) -> None:
        workers = self.workers
        self.supervisor.add(worker_id, workers.proc(worker_id), lambda: workers.start_one(worker_id))

    def add_worker(self, role: str) -> str:
        """Start one more local worker of `role` (supervised as the first ones); returns its id. The
        caller waits for it to register (`kvweave serve --planner`, controlplane/serve_planner.py)."""
        if not isinstance(self.workers, LocalWorkers):
            raise ClusterError("only a local cluster's worker processes are added here (Ray: the planner's ray connector)")
        worker_id = self.workers.add(role)
        self._supervise_worker(worker_id)
        return worker_id

    def remove_workers(self, worker_ids: list[str]) -> None:
        """Stop these local workers for good (each deregisters and drains), unsupervised first."""
        for worker_id in worker_ids:
            self.supervisor.remove(worker_id)
        self.workers.remove(worker_ids)

    def _open_log_dir(self) -> None:
        if self.config.log_dir:
            self._log_dir = Path(self.config.log_dir)
            self._log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._log_dir, self._own_log_dir = Path(tempfile.mkdtemp(prefix="kvweave-cluster-")), True

    def _make_security_files(self) -> None:
        """The secret and the Redis password the children read (paths in their environment)."""
        c = self.config
        if c.insecure:
            logger.warning("insecure cluster: no cluster secret, no Redis password")
            return
        self._secret_dir = tempfile.mkdtemp(prefix="kvweave-secret-")  # 0700
        files = cluster_secret.new_cluster_files(self._secret_dir)
        self.security_env = {cluster_secret.SECRET_ENV: os.path.abspath(c.cluster_secret_file)
                             if c.cluster_secret_file else files[cluster_secret.SECRET_ENV]}
        if c.redis_url is None:
            self.security_env[cluster_secret.REDIS_PASSWORD_ENV] = files[cluster_secret.REDIS_PASSWORD_ENV]
        elif c.redis_password_file:
            self.security_env[cluster_secret.REDIS_PASSWORD_ENV] = os.path.abspath(c.redis_password_file)
        cluster_secret.load_secret(self.security_env[cluster_secret.SECRET_ENV])  # a bad file fails here

    def _env(self) -> dict[str, str]:
        base = {k: v for k, v in child_env().items()
                if k not in (cluster_secret.SECRET_ENV, cluster_secret.REDIS_PASSWORD_ENV)}
        return {**base, "PYTHONUNBUFFERED": "1", **self.security_env}

    def _router_command(self) -> list[str]:
        c = self.config
        args = ["router", "--host", c.host, "--port", str(self.port), "--http-port", str(self.http_port),
                "--redis-url", self._public_redis_url, "--model", c.model, *(["--policy", c.policy] if c.policy else []),
                *(["--lease-s", str(c.lease_s)] if c.lease_s else []), *field_flags(c.router_args)]
        return cli_command(c, *args)

    def _make_workers(self):
        roles = worker_roles(self.config)
        if self.config.launcher == "ray":
            from controlplane.ray_launcher import RayWorkers

            return RayWorkers(self.config, roles, self._public_redis_url, self.ray_actor, self.security_env)
        return LocalWorkers(self.config, roles, self._public_redis_url, self._log_dir, with_tcmalloc(self._env()))

    @property
    def secret(self) -> "cluster_secret.ClusterSecret | None":
        """The cluster's secret (None when it runs open): in-process tools that call a worker directly
        pass it to `kvweave.cluster_secret.insecure_channel`."""
        path = self.security_env.get(cluster_secret.SECRET_ENV)
        return cluster_secret.load_secret(path) if path else None

    def router_alive(self) -> bool:
        return self.router is not None and self.router.poll() is None

    def check(self) -> str | None:
        """None while the router and every worker run, else what died, with its last log lines."""
        if self.router is not None and self.router.poll() is not None:
            return f"router exited with {self.router.returncode}:\n{tail(self._log_dir / 'router.log')}"
        return self.workers.check() if self.workers is not None else None

    async def _wait_ready(self) -> None:
        import redis.asyncio as aioredis

        from kvweave.registry import Registry

        deadline = time.monotonic() + self.config.startup_timeout
        client = aioredis.Redis.from_url(self.redis_url)
        key = self.secret.derive("registry") if self.secret else None
        try:
            registry, wanted = Registry(client, key=key), set(self.workers.worker_ids)
            while True:
                if (failure := self.check()) is not None:
                    if self._rebind_router(failure) or self._rebind_worker(failure):
                        continue
                    raise ClusterError(failure)
                live = {w.worker_id: w for w in await registry.list_workers()}
                if wanted <= live.keys() and self.router_ready():
                    self.workers.addresses = {i: live[i].address for i in self.workers.worker_ids}
                    self._worker_metrics_urls = {i: f"http://{live[i].metrics_target}/metrics"
                                                 for i in self.workers.worker_ids if live[i].metrics_target}
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(self._not_ready_message(wanted - live.keys()))
                await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    def _rebind_router(self, failure: str) -> bool:
        """Whether the router was started again on fresh ports: it lost a port picked free to another
        process before binding it (Ray's processes take ports as they start). Not when the ports
        were given, and at most PORT_REBINDS times."""
        if (not failure.startswith("router exited") or "address already in use" not in failure
                or self.config.port or self.config.http_port or self._router_rebinds >= PORT_REBINDS):
            return False
        self._router_rebinds += 1
        logger.warning("the router's port was taken before it bound it; starting it on other ports")
        self.port, self.http_port = free_port(), free_port()
        self._start_router()
        return True

    def _rebind_worker(self, failure: str) -> bool:
        """Whether a local worker that lost a port picked free to another process before binding it
        was started again on fresh ports (at most PORT_REBINDS times in all)."""
        words = failure.split(maxsplit=2)
        if (len(words) < 2 or words[0] != "worker" or "address already in use" not in failure.lower()
                or not isinstance(self.workers, LocalWorkers) or words[1] not in self.workers.worker_ids
                or self._worker_rebinds >= PORT_REBINDS):
            return False
        self._worker_rebinds += 1
        logger.warning("worker %s's port was taken before it bound it; starting it on other ports", words[1])
        self.workers.rebind(words[1])
        return True

    def _probe_tls(self) -> ssl.SSLContext | None:
        """TLS of the readiness probe of our own child on loopback: encrypted, its certificate not checked
        (the cluster does not know which CA signed it)."""
        if not self.http_url.startswith("https"):
            return None
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx

    def router_ready(self) -> bool:
        """The router's /health is ok and it sees every worker of every role (when /health says how many)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=2, context=self._probe_tls()) as resp:
                body = resp.read()
        except OSError:
            return False
        try:
            seen = json.loads(body).get("workers")
        except (ValueError, AttributeError):
            return True
        return not isinstance(seen, int) or seen >= self.config.num_workers

    def _not_ready_message(self, missing: set[str]) -> str:
        what = (f"workers not registered: {', '.join(sorted(missing))}" if missing
                else f"router /health not ok, or it sees fewer than {self.config.num_workers} workers")
        return (f"cluster not ready within {self.config.startup_timeout:.0f} s ({what})\n"
                f"router log:\n{tail(self._log_dir / 'router.log')}\n{self.workers.logs()}")

    def stop(self) -> None:
        """Stop the router, the workers and Redis; idempotent."""
        self.supervisor.stop()
        if self.router is not None:
            stop_process_groups([self.router])
            self.router = None
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._secret_dir is not None:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
            self._secret_dir = None
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LocalWorkers:
    """N `kvweave worker` processes on free ports; `roles`: worker id -> its `--role`."""

    def __init__(self, config: ClusterConfig, roles: dict[str, str], redis_url: str, log_dir: Path,
                 env: dict[str, str]) -> None:
        self.config, self.roles, self.redis_url = config, roles, redis_url
        self.worker_ids = list(roles)
        self.log_dir, self.env = log_dir, env
        self._visible_gpus = visible_gpus(config.gpus, env)
        self.gpus = assign_gpus(self.worker_ids, self._visible_gpus, config.worker_gpus)
        """worker id -> its CUDA_VISIBLE_DEVICES (empty: no GPU here)."""
        threads = config.engine_args.get("num_threads") or len(available_cores()) // max(1, len(self.worker_ids))
        bind = config.cpu_bind and not self._visible_gpus and not config.engine_args.get("cpu_cores")
        self._slots = CoreSlots(threads, len(self.worker_ids)) if bind else None
        self.cores: dict[str, list[int]] = {}
        """worker id -> the CPU cores it runs on (none: any core)."""
        self.procs: list[subprocess.Popen] = []
        self.addresses: dict[str, str] = {}
        self._ports: dict[str, tuple[int, int]] = {}
        """worker id -> (gRPC port, metrics port), kept across restarts."""
        self._lock = threading.Lock()
        """Guards the tables `add` and `remove` change while the supervisor restarts a worker."""

    def _command(self, worker_id: str, port: int, metrics_port: int) -> list[str]:
        c = self.config
        args = ["worker", "--model", c.model, "--host", c.host, "--port", str(port), "--redis-url", self.redis_url,
                "--worker-id", worker_id, "--role", self.roles[worker_id], "--metrics-port", str(metrics_port),
                *(["--lease-s", str(c.lease_s), "--heartbeat-s", str(heartbeat_s(c.lease_s))] if c.lease_s else []),
                *([] if c.peer_fetch else ["--peer-fetch", "false"]), "--max-waiting", str(c.max_waiting),
                *field_flags(worker_engine_args(c.engine_args, worker_id, self.roles[worker_id])),
                *(["--cpu-cores", format_cores(self.cores[worker_id])] if worker_id in self.cores else [])]
        return cli_command(c, *args)

    def start(self) -> None:
        for worker_id in self.worker_ids:
            self._ports[worker_id] = free_port(self.config.host), free_port(self.config.host)
            self._bind(worker_id)
            self.procs.append(self._spawn(worker_id))
            self.addresses[worker_id] = f"{self.config.host}:{self._ports[worker_id][0]}"

    def _bind(self, worker_id: str) -> None:
        cores = self._slots.take() if self._slots is not None else None
        if cores is not None:
            self.cores[worker_id] = cores

    def _spawn(self, worker_id: str) -> subprocess.Popen:
        env = {**self.env, "CUDA_VISIBLE_DEVICES": self.gpus[worker_id]} if worker_id in self.gpus else self.env
        return spawn(self._command(worker_id, *self._ports[worker_id]), self.log_dir / f"{worker_id}.log", env)

    def proc(self, worker_id: str) -> subprocess.Popen:
        with self._lock:
            return self.procs[self.worker_ids.index(worker_id)]

    def rebind(self, worker_id: str) -> None:
        """Start `worker_id` again on fresh ports (another process took one before it bound it)."""
        with self._lock:
            self._ports[worker_id] = free_port(self.config.host), free_port(self.config.host)
            self.procs[self.worker_ids.index(worker_id)] = self._spawn(worker_id)
            self.addresses[worker_id] = f"{self.config.host}:{self._ports[worker_id][0]}"

    def start_one(self, worker_id: str) -> subprocess.Popen:
        """(Re)start one worker with its id and ports (after it died); returns its process."""
        with self._lock:
            proc = self._spawn(worker_id)
            self.procs[self.worker_ids.index(worker_id)] = proc
        return proc

    def add(self, role: str) -> str:
        """Start one more worker of `role` (the next free index, free ports, its GPUs as the others'
        are shared out: `gpus_for_new_worker`); returns its id."""
        with self._lock:
            worker_id = next_worker_id(self.config, self.roles, role)
            gpus = gpus_for_new_worker(self.gpus, self._visible_gpus, self.config.worker_gpus)
            if gpus is not None:
                self.gpus[worker_id] = gpus
            self.roles[worker_id] = role
            self.worker_ids.append(worker_id)
            self._ports[worker_id] = free_port(self.config.host), free_port(self.config.host)
            self._bind(worker_id)
            self.procs.append(self._spawn(worker_id))
            self.addresses[worker_id] = f"{self.config.host}:{self._ports[worker_id][0]}"
        return worker_id

    def remove(self, worker_ids: list[str]) -> None:
        """Stop these workers (SIGTERM: each deregisters and drains, as on a pod's stop; SIGKILL after
        10 s) and forget them."""
        with self._lock:
            procs = [self.procs[self.worker_ids.index(w)] for w in worker_ids]
        stop_process_groups(procs)
        with self._lock:
            for worker_id in worker_ids:
                del self.procs[self.worker_ids.index(worker_id)]
                self.worker_ids.remove(worker_id)
                for table in (self.roles, self.addresses, self._ports, self.gpus):
                    table.pop(worker_id, None)
                if worker_id in self.cores:
                    self._slots.release(self.cores.pop(worker_id))

    def check(self) -> str | None:
        with self._lock:
            workers = list(zip(self.worker_ids, self.procs))
        for worker_id, proc in workers:
            if proc.poll() is not None:
                return f"worker {worker_id} exited with {proc.returncode}:\n{tail(self.log_dir / f'{worker_id}.log')}"
        return None

    def logs(self) -> str:
        return "\n".join(f"{i} log:\n{tail(self.log_dir / f'{i}.log')}" for i in self.worker_ids)

    def stop(self) -> None:
        stop_process_groups(self.procs)
