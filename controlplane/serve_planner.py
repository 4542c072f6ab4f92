"""The SLA planner inside `kvweave serve` (`--planner`): the loop of `kvweave planner`
(controlplane/planner_main.py: observe each pool's load, decide, apply) run in a thread of the
serving process, scaling the embedded cluster's own prefill and decode pools.

Its connector is the local one (controlplane/planner_connectors.LauncherConnector) over the
cluster's worker processes, through `LocalCluster.add_worker` / `remove_workers`, so a worker the
planner adds is restarted by the cluster's supervisor like the first ones, and one it stops is not.
Only the pools the cluster starts with (`--prefill-workers`, `--decode-workers`) are scaled; the
colocated workers are left as they are. The planner reads the cluster's Redis with the cluster's
registry key, and its workers stop with the cluster.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from controlplane.cluster_config import ClusterError
from controlplane.planner import POOL_ROLES
from controlplane.planner_connectors import LauncherConnector
from controlplane.planner_main import PlannerConfig, PlannerLoop, model_id, start_metrics_server
from controlplane.planner_observer import LoadObserver

if TYPE_CHECKING:
    from controlplane.cluster import LocalCluster
    from controlplane.cluster_config import ClusterConfig

logger = logging.getLogger(__name__)

SERVE_PLANNER_FIELDS = ("ttft_target_ms", "itl_target_ms", "quantile", "min_replicas", "max_replicas",
                        "prefill_min_replicas", "prefill_max_replicas", "decode_min_replicas", "decode_max_replicas",
                        "prefill_tokens_per_s", "decode_running", "interval_s", "window", "grace_intervals",
                        "hysteresis", "correction", "min_gain")
"""PlannerConfig fields `kvweave serve --planner` takes as flags (the same flags as `kvweave planner`)."""


def scaled_pools(cluster: ClusterConfig) -> tuple[str, ...]:
    """The pools a serve planner scales: those the cluster starts. ValueError when it starts none, or
    when its workers are not local processes."""
    if cluster.launcher != "local":
        raise ValueError("--planner scales local worker processes; with --launcher ray run "
                         "`kvweave planner --connector ray` beside the cluster")
    pools = tuple(role for role in POOL_ROLES if cluster.role_counts.get(role, 0) > 0)
    if not pools:
        raise ValueError("--planner scales the prefill and decode pools: start them with --prefill-workers N "
                         "and/or --decode-workers N")
    return pools


def serve_planner_config(cluster: ClusterConfig, metrics_port: int = 0, **planner_args) -> PlannerConfig:
    """The planner settings of a serve cluster (`planner_args`: SERVE_PLANNER_FIELDS); ValueError
    for bad ones. Its Redis is filled in when the cluster runs (`ServePlanner`). `metrics_port`: where
    it serves its Prometheus metrics on the cluster's host (0: a free port, -1: none)."""
    scaled_pools(cluster)
    return PlannerConfig(connector="local", model=cluster.model, host=cluster.host, metrics_port=metrics_port,
                         **planner_args)


class ClusterWorkers:
    """A running LocalCluster's local workers, as the LauncherConnector sees a launcher's; `stop`
    leaves them to the cluster."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    @property
    def roles(self) -> dict[str, str]:
        return self.cluster.worker_roles

    def add(self, role: str) -> str:
        return self.cluster.add_worker(role)

    def remove(self, worker_ids: list[str]) -> None:
        self.cluster.remove_workers(worker_ids)

    def stop(self) -> None:
        pass


class ServePlanner:
    """A PlannerLoop over a started LocalCluster's pools, stepping every `config.interval_s` in a
    thread of its own between `start` and `stop`. `loop` (set once started) holds the planner, its
    metrics and its recent decisions."""

    def __init__(self, cluster: LocalCluster, config: PlannerConfig) -> None:
        self.cluster = cluster
        self.config = dataclasses.replace(config, redis_url=cluster.redis_url)
        self.connector = LauncherConnector(ClusterWorkers(cluster), roles=scaled_pools(cluster.config))
        self.loop: PlannerLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: Exception | None = None
        self.metrics_url: str | None = None
        """Where the planner's `kvweave_planner_*` metrics are served (set once started; None: not served)."""

    def start(self) -> "ServePlanner":
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), name="kvweave-planner", daemon=True)
        self._thread.start()
        self._started.wait()
        if self.loop is None or self._stop is None:  # it failed to start (its error is logged)
            self._thread.join()
            self._thread = None
            raise ClusterError(f"the planner did not start: {self._failure or 'see the log'}")
        logger.info("planner: scaling the %s pool(s) every %.1f s", ", ".join(self.connector.roles),
                    self.config.interval_s)
        return self

    async def _run(self) -> None:
        import redis.asyncio as aioredis

        from kvweave.registry import Registry

        secret = self.cluster.secret
        client = aioredis.Redis.from_url(self.config.redis_url)
        runner = None
        try:
            registry = Registry(client, key=secret.derive("registry") if secret else None)
            observer = LoadObserver(registry, model_id(self.config.model), self.config.quantile)
            self.loop = PlannerLoop(self.config, observer, self.connector)
            if self.config.metrics_port >= 0:
                runner, port = await start_metrics_server(self.loop.metrics, self.config.host, self.config.metrics_port)
                self.metrics_url = f"http://{self.config.host}:{port}/metrics"
            self._event_loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            await self.loop.run(self._stop)
        except Exception as e:
            self._failure = e
            if self._stop is not None:
                raise
        finally:
            self._started.set()
            if runner is not None:
                await runner.cleanup()
            await client.aclose()

    def stop(self) -> None:
        """Stop stepping (an interval in progress finishes first); idempotent."""
        if self._thread is None:
            return
        if self._event_loop is not None and not self._event_loop.is_closed():
            self._event_loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None
