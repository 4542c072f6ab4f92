"""`kvweave serve`: a whole cluster on this machine (Redis, N workers, the router) until Ctrl-C or SIGTERM.

The workers are colocated unless --prefill-workers / --decode-workers ask for disaggregated pools;
then --workers (colocated) defaults to none, so `--prefill-workers 1 --decode-workers 1` starts
exactly those two, and `--workers N` adds N colocated workers beside them. --encode-workers N adds
N encode workers for a vision-language model (the router has them encode the requests' images).

It composes the layers from the top: its flags come from ClusterConfig, the router's chunk
separator and the engine's config; with --launcher ray it hands the control plane's Ray launcher
the worker's actor class (worker.ray_actor.WorkerActor).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from controlplane.cluster import LocalCluster
from controlplane.cluster_config import LAUNCHERS, ClusterConfig, ClusterError
from controlplane.router import RouterConfig
from kvweave.cluster_secret import redact
from controlplane.router_main import ServeOptions
from kvweave.config_flags import add_config_args, config_kwargs, env_name


class _Terminated(Exception):
    """Raised in the main thread by the SIGTERM handler."""


SERVE_DEFAULTS = {"workers": None, "port": 50051, "http_port": 8000}
"""Where `kvweave serve` differs from ClusterConfig's defaults (fixed, well-known ports for a user;
workers None: `default_workers`)."""
SERVE_DEFAULT_TEXTS = {"workers": "1, or 0 with --prefill-workers or --decode-workers"}
CLUSTER_FLAGS_EXCLUDED = ("model", "log_level", "router_args")
ROUTER_ARGS = ("disagg_threshold_tokens", "disagg_max_prefill_queue_tokens", "disagg_handoff_margin",
               "request_timeout_s", "stall_timeout_s", "max_migrations", "max_images_per_request", "max_image_bytes",
               "max_image_pixels", "allow_image_urls")
"""RouterConfig fields `kvweave serve` takes as flags and hands its router (the prefill/decode decision;
deadlines, stalls and migration, docs/resilience.md)."""
SECURITY_ARGS = ("api_keys_file", "tls_cert_file", "tls_key_file")
"""ServeOptions fields `kvweave serve` hands its router: API keys, TLS (mutual TLS: run `kvweave router`)."""
"""ClusterConfig fields with no flag of their own here: --model is the engine's, --log-level global."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worker.engine_args import add_engine_args

    p = sub.add_parser(
        "serve", help="start a cluster on this machine: Redis, N workers and the router",
        description="Starts a private redis-server (unless --redis-url), N workers (local processes, or Ray actors "
                    "with --launcher ray) and the router; waits until all are ready, prints the endpoints, and "
                    "stops everything on Ctrl-C or SIGTERM. Engine flags are passed on to every worker. "
                    "By default one colocated worker; --prefill-workers and --decode-workers start "
                    "disaggregated pools instead (--workers N adds N colocated workers beside them); "
                    "--encode-workers adds encode workers for a vision-language model's images.")
    add_config_args(p, ClusterConfig, exclude=CLUSTER_FLAGS_EXCLUDED, defaults=SERVE_DEFAULTS,
                    default_texts=SERVE_DEFAULT_TEXTS, choices={"launcher": LAUNCHERS})
    add_config_args(p.add_argument_group("router"), RouterConfig, only=["chunk_separator", *ROUTER_ARGS])
    add_config_args(p.add_argument_group("router security"), ServeOptions, only=list(SECURITY_ARGS))
    add_engine_args(p)
    add_planner_args(p)
    p.set_defaults(func=run)


def add_planner_args(p: argparse.ArgumentParser) -> None:
    from controlplane.planner_main import PlannerConfig
    from controlplane.serve_planner import SERVE_PLANNER_FIELDS

    group = p.add_argument_group("planner", "with --planner, the SLA planner of `kvweave planner` runs in this "
                                            "process and scales the prefill and decode pools started here")
    group.add_argument("--planner", action="store_true", help="scale the prefill and decode pools toward the TTFT and "
                       "ITL targets (adds and stops local worker processes; docs/deployment.md)")
    add_config_args(group, PlannerConfig, only=SERVE_PLANNER_FIELDS)
    group.add_argument("--planner-metrics-port", type=int, default=0, metavar="PORT",
                       help="port of the planner's Prometheus metrics (kvweave_planner_*) on --host; 0: a free "
                            "port, -1: none (default: 0)")


def planner_config(args: argparse.Namespace, config: ClusterConfig):
    """The in-process planner's settings (None without --planner); ValueError for bad ones."""
    from controlplane.planner_main import PlannerConfig
    from controlplane.serve_planner import SERVE_PLANNER_FIELDS, serve_planner_config

    if not args.planner:
        return None
    return serve_planner_config(config, metrics_port=args.planner_metrics_port,
                                **config_kwargs(PlannerConfig, args, only=SERVE_PLANNER_FIELDS))


def changed_engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings that differ from EngineConfig's defaults (the model excluded)."""
    from worker.engine import EngineConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if f.name != "model" and getattr(args, f.name) != f.default}


def default_workers(prefill_workers: int, decode_workers: int) -> int:
    """Colocated workers when --workers is not given: none beside disaggregated pools, else one."""
    return 0 if prefill_workers or decode_workers else 1


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    kwargs = config_kwargs(ClusterConfig, args, exclude=CLUSTER_FLAGS_EXCLUDED)
    if kwargs["workers"] is None:
        kwargs["workers"] = default_workers(kwargs["prefill_workers"], kwargs["decode_workers"])
    router_args = {name: getattr(args, name) for name in ROUTER_ARGS
                   if getattr(args, name) != RouterConfig.__dataclass_fields__[name].default}
    router_args |= {name: getattr(args, name) for name in SECURITY_ARGS if getattr(args, name) is not None}
    return ClusterConfig(**kwargs, model=args.model, engine_args=changed_engine_args(args), router_args=router_args,
                         log_level=args.log_level)


def describe_pools(config: ClusterConfig) -> str:
    """"2 worker(s)" for colocated workers only, else each pool: "1 prefill + 1 decode worker(s)"."""
    counts = config.role_counts
    if counts.keys() == {"colocated"}:
        return f"{config.workers} worker(s)"
    return " + ".join(f"{n} {role}" for role, n in counts.items()) + " worker(s)"


def format_endpoints(cluster: LocalCluster, planner_metrics: str | None = None) -> str:
    c = cluster.config
    lines = [f"kvweave cluster ready: {describe_pools(c)} ({c.launcher}), model {c.model}",
             f"  grpc    {cluster.grpc_target}",
             f"  http    {cluster.http_url}/v1",
             f"  redis   {redact(cluster.redis_url)}"]
    roles = cluster.worker_roles
    lines += [f"  worker  {worker_id} {address} {roles[worker_id]}"
              for worker_id, address in cluster.worker_addresses.items()]
    lines += [f"  metrics {name} {url}" for name, url in cluster.metrics_urls.items()]
    if planner_metrics:
        lines.append(f"  metrics planner {planner_metrics}")
    lines.append(f"  logs    {cluster.log_dir}")
    return "\n".join(lines)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _supervise(cluster: LocalCluster) -> int:
    """Block until a signal (0) or the router is down for good (1: it died with restarts off, or the
    supervisor gave up on it). A worker (or Redis) down for good is reported once; the cluster's
    supervisor restarts what dies (`--restart`, `--max-restarts`)."""
    reported: set[str] = set()
    restarting = cluster.config.restart
    while True:
        time.sleep(0.5)
        if "router" in cluster.supervisor.given_up or (not restarting and not cluster.router_alive()):
            print(f"error: the router is down: {cluster.check()}", file=sys.stderr, flush=True)
            return 1
        if restarting:
            down = [f"{name} crashed {cluster.config.max_restarts} times in a row and stays down"
                    for name in cluster.supervisor.given_up]
        else:
            down = [cluster.workers.check()]
        for failure in filter(None, down):
            if failure not in reported:
                reported.add(failure)
                print(f"warning: {failure}\nthe router keeps serving with the other workers", file=sys.stderr,
                      flush=True)


def router_env(args: argparse.Namespace) -> dict[str, str]:
    """The router settings `kvweave serve` hands its router through the environment (the KVWEAVE_*
    overrides of RouterConfig's flags): the engine's chunk limit, and the chunk separator."""
    env = {env_name("max_chunks_per_request"): str(args.max_chunks_per_request)}
    if args.chunk_separator:
        env[env_name("chunk_separator")] = args.chunk_separator
    return env


def ray_actor_class() -> type:
    """The Ray actor class that runs a worker (imports the worker package, hence torch)."""
    from worker.ray_actor import WorkerActor

    return WorkerActor


def run(args: argparse.Namespace) -> int:
    if args.chunk_separator == "":
        print("error: --chunk-separator must not be empty", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        planning = planner_config(args, config)
        cluster = LocalCluster(config, ray_actor=ray_actor_class() if config.launcher == "ray" else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.update(router_env(args))  # the router process inherits them
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    planner = None
    try:
        cluster.start()
        if planning is not None:
            from controlplane.serve_planner import ServePlanner

            planner = ServePlanner(cluster, planning).start()
        print(format_endpoints(cluster, planner.metrics_url if planner is not None else None), flush=True)
        return _supervise(cluster)
    except (_Terminated, KeyboardInterrupt):
        return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        if planner is not None:
            planner.stop()
        cluster.stop()
        print("kvweave cluster stopped", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
