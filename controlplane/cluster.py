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
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from controlplane.cluster_config import (
    ClusterConfig, ClusterError, cli_command, field_flags, heartbeat_s, worker_engine_args, worker_roles,
)
from controlplane.procs import LOCALHOST, RedisServer, child_env, free_port, spawn, stop_process_groups, tail

logger = logging.getLogger(__name__)

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
        self.port = self.config.port or free_port()
        self.http_port = self.config.http_port or free_port()

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
        return self.config.redis_url or self.redis.url

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

    def pids(self) -> list[int]:
        """Every local child process (Redis, router, worker processes)."""
        procs = [self.redis.proc if self.redis else None, self.router, *getattr(self.workers, "procs", [])]
        return [p.pid for p in procs if p is not None]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        """Start everything and wait until ready; on failure stops what started and raises ClusterError."""
        try:
            self._open_log_dir()
            if self.config.redis_url is None:
                if self.config.ray_address:
                    logger.warning("the private Redis listens on %s only: Ray workers on other nodes need "
                                   "--redis-url", LOCALHOST)
                self.redis = RedisServer().start()
            self.router = spawn(self._router_command(), self._log_dir / "router.log", self._env())
            self.workers = self._make_workers()
            self.workers.start()
            run_sync(self._wait_ready())
        except BaseException:
            self.stop()
            raise
        return self

    def _open_log_dir(self) -> None:
        if self.config.log_dir:
            self._log_dir = Path(self.config.log_dir)
            self._log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._log_dir, self._own_log_dir = Path(tempfile.mkdtemp(prefix="kvweave-cluster-")), True

    def _env(self) -> dict[str, str]:
        return child_env(PYTHONUNBUFFERED="1")

    def _router_command(self) -> list[str]:
        c = self.config
        args = ["router", "--host", c.host, "--port", str(self.port), "--http-port", str(self.http_port),
                "--redis-url", self.redis_url, "--model", c.model, *(["--policy", c.policy] if c.policy else []),
                *(["--lease-s", str(c.lease_s)] if c.lease_s else []), *field_flags(c.router_args)]
        return cli_command(c, *args)

    def _make_workers(self):
        roles = worker_roles(self.config)
        if self.config.launcher == "ray":
            from controlplane.ray_launcher import RayWorkers

            return RayWorkers(self.config, roles, self.redis_url, self.ray_actor)
        return LocalWorkers(self.config, roles, self.redis_url, self._log_dir, self._env())

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
        try:
            registry, wanted = Registry(client), set(self.workers.worker_ids)
            while True:
                if (failure := self.check()) is not None:
                    raise ClusterError(failure)
                live = {w.worker_id: w for w in await registry.list_workers()}
                if wanted <= live.keys() and self._router_ready():
                    self.workers.addresses = {i: live[i].address for i in self.workers.worker_ids}
                    self._worker_metrics_urls = {i: f"http://{live[i].metrics_target}/metrics"
                                                 for i in self.workers.worker_ids if live[i].metrics_target}
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(self._not_ready_message(wanted - live.keys()))
                await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    def _probe_tls(self) -> ssl.SSLContext | None:
        """TLS of the readiness probe of our own child on loopback: encrypted, its certificate not checked
        (the cluster does not know which CA signed it)."""
        if not self.http_url.startswith("https"):
            return None
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx

    def _router_ready(self) -> bool:
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
        if self.router is not None:
            stop_process_groups([self.router])
            self.router = None
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
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
        self.procs: list[subprocess.Popen] = []
        self.addresses: dict[str, str] = {}

    def _command(self, worker_id: str, port: int, metrics_port: int) -> list[str]:
        c = self.config
        args = ["worker", "--model", c.model, "--host", c.host, "--port", str(port), "--redis-url", self.redis_url,
                "--worker-id", worker_id, "--role", self.roles[worker_id], "--metrics-port", str(metrics_port),
                *(["--lease-s", str(c.lease_s), "--heartbeat-s", str(heartbeat_s(c.lease_s))] if c.lease_s else []),
                *([] if c.peer_fetch else ["--peer-fetch", "false"]),
                *field_flags(worker_engine_args(c.engine_args, worker_id))]
        return cli_command(c, *args)

    def start(self) -> None:
        for worker_id in self.worker_ids:
            port, metrics_port = free_port(self.config.host), free_port(self.config.host)
            self.procs.append(spawn(self._command(worker_id, port, metrics_port), self.log_dir / f"{worker_id}.log",
                                    self.env))
            self.addresses[worker_id] = f"{self.config.host}:{port}"

    def check(self) -> str | None:
        for worker_id, proc in zip(self.worker_ids, self.procs):
            if proc.poll() is not None:
                return f"worker {worker_id} exited with {proc.returncode}:\n{tail(self.log_dir / f'{worker_id}.log')}"
        return None

    def logs(self) -> str:
        return "\n".join(f"{i} log:\n{tail(self.log_dir / f'{i}.log')}" for i in self.worker_ids)

    def stop(self) -> None:
        stop_process_groups(self.procs)
