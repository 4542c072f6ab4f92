"""`kvweave planner`: the SLA planner process. Every `interval_s` it observes each pool's load
(controlplane/planner_observer.py), decides its replicas (controlplane/planner.py) and applies
them through a connector (controlplane/planner_connectors.py): the Kubernetes Deployments of the
Helm chart, `kvweave worker` processes it starts on this machine, or worker actors it starts in a
Ray cluster (the actor class comes from the CLI layer, cli/planner.py: the control plane never
imports the worker).

Each decision is logged with its reason and figures, and counted in the planner's own Prometheus
metrics (`kvweave_planner_*`, docs/metrics.md) on `--metrics-port`. `--once` observes and decides
one interval and exits (the first observation of a worker's metrics is a baseline, so `--once`
waits one interval between two observations); `--dry-run` decides without scaling.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from controlplane.planner import POOL_ROLES, REASONS, Decision, Planner, PlannerParams, PoolPolicy
from controlplane.planner_connectors import Connector, ConnectorError
from controlplane.planner_observer import LoadObserver
from kvweave import cluster_secret
from kvweave.config_flags import add_config_args, config_kwargs, flag
from kvweave.metrics import CONTENT_TYPE, serve_http
from kvweave.model_files import model_name, resolve_model
from kvweave.registry import Registry

if TYPE_CHECKING:
    from controlplane.cluster_config import ClusterConfig

logger = logging.getLogger(__name__)

CONNECTORS = ("kubernetes", "local", "ray")
RECENT_DECISIONS = 1000


@dataclass
class PlannerConfig:
    connector: str = field(default="kubernetes", metadata=flag(choices=CONNECTORS))
    """kubernetes: scale the pools' Deployments (--prefill-deployment, --decode-deployment); local:
    start and stop `kvweave worker` processes of each pool on this machine; ray: start and stop worker
    actors of each pool in a Ray cluster (--ray-address, else a local one), named per role and index
    in --ray-namespace."""
    namespace: str | None = None
    """Kubernetes namespace of the Deployments (None: the pod's own, else "default")."""
    prefill_deployment: str | None = None
    """The prefill pool's Deployment (kubernetes; None: the pool is not scaled)."""
    decode_deployment: str | None = None
    """The decode pool's Deployment (kubernetes; None: the pool is not scaled)."""
    kubeconfig: str | None = None
    """kubeconfig file used outside a pod (None: in-cluster, else $KUBECONFIG or ~/.kube/config)."""
    ray_address: str | None = None
    """Ray cluster the ray connector starts its worker actors in (None: a local Ray cluster on 127.0.0.1);
    its nodes must reach --redis-url."""
    ray_namespace: str = "kvweave"
    """Ray namespace of the ray connector's worker actors, named `kvweave-<worker id>` (`kvweave-decode-1`).
    The worker actors already there (`kvweave serve --launcher ray`, an earlier planner's) are adopted:
    they count, may be stopped, and the actors the planner adds copy their engine settings (else the
    engine's defaults). The actors it adds are detached: they outlive the planner (with --ray-address)."""
    cpus_per_worker: float = 1.0
    """CPUs each worker actor of the ray connector reserves."""
    gpus_per_worker: float = 0.0
    """GPUs each worker actor of the ray connector reserves (Ray places it on a GPU node)."""
    ttft_target_ms: float = 500.0
    """Time-to-first-token target of the prefill pool (its workers' TTFT quantile), ms."""
    itl_target_ms: float = 50.0
    """Inter-token latency target of the decode pool (its workers' ITL quantile), ms."""
    quantile: float = 0.9
    """Quantile of TTFT and ITL held to the targets."""
    min_replicas: int = 1
    """Fewest workers of each pool."""
    max_replicas: int = 8
    """Most workers of each pool."""
    prefill_min_replicas: int | None = None
    """Fewest prefill workers (None: --min-replicas)."""
    prefill_max_replicas: int | None = None
    """Most prefill workers (None: --max-replicas); equal to --prefill-min-replicas, the pool keeps its size."""
    decode_min_replicas: int | None = None
    """Fewest decode workers (None: --min-replicas)."""
    decode_max_replicas: int | None = None
    """Most decode workers (None: --max-replicas)."""
    prefill_tokens_per_s: float = 4096.0
    """First estimate of the prompt tokens per second one prefill worker prefills within the TTFT
    target; the correction factor adjusts it to what is observed."""
    decode_running: float = 32.0
    """First estimate of the requests one decode worker decodes at once within the ITL target;
    the correction factor adjusts it to what is observed."""
    interval_s: float = 10.0
    """Seconds between decisions."""
    window: int = 6
    """Intervals of load history behind each prediction."""
    grace_intervals: int = 3
    """Intervals after a scale change during which the pool is left alone."""
    hysteresis: float = 0.2
    """Scale down only to replicas loaded at most (1 - hysteresis) of their capacity."""
    correction: bool = True
    """Correct the capacity estimates by observed / predicted latency (false: the first estimates decide)."""
    min_gain: float = PlannerParams.min_gain
    """Share of the latency fall a scale-up predicts (latency x old / new replicas) that it must bring,
    at about the same load; less holds the pool there (reason futile) until the load changes (0: off)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The cluster's Redis (its registry of workers)."""
    model: str | None = None
    """Only workers serving this model count (None: all); the model of the workers the local and ray
    connectors start."""
    metrics_port: int = 9401
    """HTTP port of the planner's GET /metrics (0: a free port, -1: none)."""
    host: str = "0.0.0.0"
    """Interface of the metrics port."""
    once: bool = field(default=False, metadata=flag(action="store_true"))
    """Observe and decide one interval, apply it (unless --dry-run), print the decisions and exit."""
    dry_run: bool = field(default=False, metadata=flag(action="store_true"))
    """Decide and log, but scale nothing."""

    def __post_init__(self) -> None:
        if self.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {self.connector!r}; valid: {', '.join(CONNECTORS)}")
        if self.connector == "kubernetes" and not (self.prefill_deployment or self.decode_deployment):
            raise ValueError("the kubernetes connector needs --prefill-deployment or --decode-deployment (or both)")
        if self.connector in ("local", "ray") and self.model is None:
            raise ValueError(f"the {self.connector} connector needs --model: the model of the workers it starts")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus-per-worker and gpus-per-worker must be >= 0")
        for name in ("ttft_target_ms", "itl_target_ms", "prefill_tokens_per_s", "decode_running", "interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics-port must be in [0, 65535], or -1 for none; got {self.metrics_port}")
        self.policies()  # validates the bounds
        self.params()  # validates window, grace, hysteresis and min-gain

    @property
    def deployments(self) -> dict[str, str]:
        """Pool role -> its Deployment, for the pools given."""
        names = {"prefill": self.prefill_deployment, "decode": self.decode_deployment}
        return {role: name for role, name in names.items() if name}

    def bounds(self, role: str) -> tuple[int, int]:
        """(fewest, most) workers of the pool `role`: its own bounds where given, else the common ones."""
        low, high = getattr(self, f"{role}_min_replicas"), getattr(self, f"{role}_max_replicas")
        return (self.min_replicas if low is None else low), (self.max_replicas if high is None else high)

    def policies(self) -> dict[str, PoolPolicy]:
        policies = {}
        for role, target, capacity in (("prefill", self.ttft_target_ms, self.prefill_tokens_per_s),
                                       ("decode", self.itl_target_ms, self.decode_running)):
            low, high = self.bounds(role)
            try:
                policies[role] = PoolPolicy(target, capacity, min_replicas=low, max_replicas=high)
            except ValueError:
                raise ValueError(f"{role} pool: need 0 <= min-replicas <= max-replicas and max-replicas >= 1, "
                                 f"got {low} and {high}") from None
        return policies

    def params(self) -> PlannerParams:
        return PlannerParams(self.interval_s, self.window, self.grace_intervals, self.hysteresis,
                             correction=self.correction, min_gain=self.min_gain)


def model_id(model: str | None) -> str | None:
    """The name workers register for `model` (a built-in name, or a checkpoint's folder or file name);
    a model not found here (the planner's pod holds no checkpoint) is taken as that name."""
    if model is None:
        return None
    try:
        return model_name(model, resolve_model(model))
    except ValueError:  # ModelNotFoundError, CheckpointError
        return model


class PlannerMetrics:
    """`kvweave_planner_*` in their own CollectorRegistry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter("kvweave_planner_decisions", "Decisions per pool and reason", ["pool", "reason"],
                                 registry=r)
        for pool in POOL_ROLES:
            for reason in REASONS:
                self.decisions.labels(pool, reason)
        self.replicas = Gauge("kvweave_planner_replicas", "Replicas of each pool before the last decision",
                              ["pool"], registry=r)
        self.target = Gauge("kvweave_planner_target_replicas", "Replicas each pool was set to", ["pool"], registry=r)
        self.predicted_load = Gauge("kvweave_planner_predicted_load", "Predicted load of the next interval "
                                    "(prefill: prompt tokens/s; decode: running requests)", ["pool"], registry=r)
        self.correction = Gauge("kvweave_planner_correction_factor", "Observed / predicted latency, smoothed",
                                ["pool"], registry=r)
        self.errors = Counter("kvweave_planner_errors", "Intervals that failed (Redis or the connector)", registry=r)

    def record(self, d: Decision) -> None:
        self.decisions.labels(d.role, d.reason).inc()
        self.replicas.labels(d.role).set(d.current_replicas)
        self.target.labels(d.role).set(d.target_replicas)
        self.predicted_load.labels(d.role).set(d.predicted_load)
        self.correction.labels(d.role).set(d.correction_factor)


class PlannerLoop:
    """observe -> decide -> apply, once per `step`."""

    def __init__(self, config: PlannerConfig, observer: LoadObserver, connector: Connector,
                 metrics: PlannerMetrics | None = None) -> None:
        self.config, self.observer, self.connector = config, observer, connector
        self.metrics = metrics or PlannerMetrics()
        self.planner = Planner({r: p for r, p in config.policies().items() if r in connector.roles}, config.params())
        self.decisions: deque[tuple[float, Decision]] = deque(maxlen=RECENT_DECISIONS)
        """The recent decisions with their time.monotonic(), oldest first (for whoever embeds the loop)."""

    async def step(self) -> list[Decision]:
        observations = [o for o in await self.observer.observe() if o.role in self.connector.roles]
        for o in observations:  # what the platform was asked for, not only the workers registered yet
            o.num_replicas = await self.connector.get_replicas(o.role)
        decisions = self.planner.decide(observations)
        now = time.monotonic()
        for d in decisions:
            self.decisions.append((now, d))
            self.metrics.record(d)
            log = logger.info if d.changed else logger.debug
            log("%s pool: %d -> %d replicas (%s; %s)%s", d.role, d.current_replicas, d.target_replicas, d.reason,
                d.detail, " [dry run]" if self.config.dry_run and d.changed else "")
            if d.changed and not self.config.dry_run:
                await self.connector.set_replicas(d.role, d.target_replicas)
        return decisions

    async def run(self, stop: asyncio.Event) -> None:
        """Step every interval until `stop` is set; a failed interval is logged and counted."""
        while not stop.is_set():
            try:
                await self.step()
            except (redis.RedisError, ConnectorError, OSError) as e:
                self.metrics.errors.inc()
                logger.warning("planner interval failed, trying again next interval: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), self.config.interval_s)
            except asyncio.TimeoutError:
                pass


async def start_metrics_server(metrics: PlannerMetrics, host: str, port: int) -> tuple[web.AppRunner, int]:
    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE})

    return await serve_http({"/metrics": get_metrics}, host, port)


def make_connector(config: PlannerConfig, ray_actor: Callable[[], type] | None = None) -> Connector:
    """The configured connector (ConnectorError when Kubernetes or Ray is not usable). `ray_actor`: for
    the ray connector, returns the actor class that runs a worker (`worker.ray_actor.WorkerActor`)."""
    if config.connector == "kubernetes":
        from controlplane.planner_connectors import KubernetesConnector, default_namespace, kubernetes_api_client

        return KubernetesConnector(config.namespace or default_namespace(), config.deployments,
                                   kubernetes_api_client(config.kubeconfig))
    if config.connector == "ray":
        if ray_actor is None:
            raise ConnectorError("the ray connector needs the worker's actor class (`kvweave planner` passes "
                                 "worker.ray_actor.WorkerActor)")
        return ray_connector(config, ray_actor())
    return local_connector(config)


def _cluster_config(config: PlannerConfig, **options) -> ClusterConfig:
    """The settings of the workers a launcher connector starts (no worker started yet: the first
    decision brings each pool to `min_replicas`)."""
    from controlplane.cluster_config import ClusterConfig

    # `workers` only sizes a local Ray cluster: room for every pool at its most
    return ClusterConfig(workers=sum(config.bounds(role)[1] for role in POOL_ROLES), model=config.model,
                         redis_url=config.redis_url, **options)


def local_connector(config: PlannerConfig) -> Connector:
    """A LauncherConnector of `kvweave worker` processes that register in the planner's Redis."""
    import tempfile
    from pathlib import Path

    from controlplane.cluster import LocalWorkers
    from controlplane.planner_connectors import LauncherConnector
    from controlplane.procs import child_env, with_tcmalloc

    log_dir = Path(tempfile.mkdtemp(prefix="kvweave-planner-"))
    logger.info("local workers log to %s", log_dir)
    workers = LocalWorkers(_cluster_config(config), {}, config.redis_url, log_dir, with_tcmalloc(child_env()))
    return LauncherConnector(workers)


def ray_connector(config: PlannerConfig, actor_cls: type) -> Connector:
    """A LauncherConnector of `actor_cls` actors in the Ray cluster at `ray_address` (else a local one,
    started now: ConnectorError when Ray cannot start); they register in the planner's Redis. The
    worker actors already in `ray_namespace` (`kvweave serve --launcher ray`, or an earlier planner's) are
    adopted: they count and scaling down may stop them. The actors it starts are detached: they keep
    serving when the planner exits, for the next planner to adopt (unless the planner started a local
    Ray cluster, which stops with it)."""
    from controlplane.planner_connectors import LauncherConnector
    from controlplane.ray_launcher import RayStartError, RayWorkers

    cluster = _cluster_config(config, launcher="ray", ray_address=config.ray_address,
                              ray_namespace=config.ray_namespace, cpus_per_worker=config.cpus_per_worker,
                              gpus_per_worker=config.gpus_per_worker)
    security_env = {name: os.environ[name] for name in (cluster_secret.SECRET_ENV, cluster_secret.REDIS_PASSWORD_ENV)
                    if os.environ.get(name)}  # what `install` set: the actors get the files' contents
    workers = RayWorkers(cluster, {}, config.redis_url, actor_cls, security_env, detached=True)
    try:
        workers.start()
        if adopted := workers.adopt():
            logger.info("Ray namespace %s already holds workers %s: they count and may be stopped",
                        config.ray_namespace, ", ".join(adopted))
        workers.watch()  # Ray re-creates an actor whose process died; the watcher starts its worker again
    except RayStartError as e:
        raise ConnectorError(str(e)) from None
    return LauncherConnector(workers)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("planner", help="scale the prefill and decode pools toward TTFT and ITL targets",
                       description="The SLA planner: every interval it reads each pool's load (the registry in "
                                   "Redis and the workers' metrics), predicts the next interval's, and scales the "
                                   "prefill pool toward the TTFT target and the decode pool toward the ITL target "
                                   "(Kubernetes Deployments, local worker processes, or worker actors in a Ray cluster).")
    add_config_args(p, PlannerConfig)
    add_config_args(p, cluster_secret.SecurityOptions)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, ray_actor: Callable[[], type] | None = None) -> int:
    """`ray_actor`: see `make_connector`."""
    try:
        config = PlannerConfig(**config_kwargs(PlannerConfig, args))
        cluster_secret.install(cluster_secret.SecurityOptions(**config_kwargs(cluster_secret.SecurityOptions, args)))
        connector = make_connector(config, ray_actor)
    except (ValueError, ConnectorError) as e:  # SecretError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config, connector))
    except redis.RedisError as e:
        print(f"error: cannot reach Redis at {cluster_secret.redact(config.redis_url)}: {e}", file=sys.stderr)
        return 1
    except (ConnectorError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


async def _serve(config: PlannerConfig, connector: Connector) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(cluster_secret.redis_url(config.redis_url))
    loop = PlannerLoop(config, LoadObserver(Registry(client), model_id(config.model), config.quantile), connector)
    runner = None
    try:
        if config.once:
            await loop.observer.observe()  # the metrics' baseline
            await asyncio.sleep(config.interval_s)
            for d in await loop.step():
                print(f"{d.role}: {d.current_replicas} -> {d.target_replicas} ({d.reason}; {d.detail})", flush=True)
            return 0
        if config.metrics_port >= 0:
            runner, port = await start_metrics_server(loop.metrics, config.host, config.metrics_port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"kvweave planner ready: {config.connector}, pools {', '.join(connector.roles)}"
              + (f", metrics http://{config.host}:{port}/metrics" if runner else ""), flush=True)
        await loop.run(stop)
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        await connector.close()
        await client.aclose()
