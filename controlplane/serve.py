"""`kvweave serve`: a whole cluster on this machine (Redis, N workers, the router) until Ctrl-C or SIGTERM."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from controlplane.cluster import LAUNCHERS, ClusterConfig, ClusterError, LocalCluster


class _Terminated(Exception):
    """Raised in the main thread by the SIGTERM handler."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from controlplane.router_main import add_chunk_separator_arg
    from worker.engine_args import add_engine_args, parse_bool

    p = sub.add_parser(
        "serve", help="start a cluster on this machine: Redis, N workers and the router",
        description="Starts a private redis-server (unless --redis-url), N workers (local processes, or Ray actors "
                    "with --launcher ray) and the router; waits until all are ready, prints the endpoints, and "
                    "stops everything on Ctrl-C or SIGTERM. Engine flags are passed on to every worker.")
    p.add_argument("--workers", type=int, default=1, help="number of workers (default: 1)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port, 0 for a free one (default: 50051)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="router OpenAI HTTP port, 0 for a free one (default: 8000)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--policy", help="routing policy (default: the router's)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local", help="how workers run (default: local)")
    p.add_argument("--ray-address", help="Ray cluster to join with --launcher ray (default: start a local one)")
    p.add_argument("--ray-temp-dir", help="temp dir of a local Ray cluster")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker actor (default: 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray worker actor (default: 1)")
    p.add_argument("--lease-s", type=float, help="workers' registry lease in seconds (default: the worker's)")
    p.add_argument("--peer-fetch", type=parse_bool, default=True, metavar="BOOL",
                   help="workers fetch the KV blocks and chunk-caches they lack from peers that hold them "
                        "(default: true)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds to wait for the cluster to be ready (default: 300)")
    p.add_argument("--log-dir", help="folder for the children's logs (default: a temp folder, removed at exit)")
    add_chunk_separator_arg(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def changed_engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings that differ from EngineConfig's defaults (the model excluded)."""
    from worker.engine import EngineConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if f.name != "model" and getattr(args, f.name) != f.default}


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        workers=args.workers, model=args.model, host=args.host, port=args.port, http_port=args.http_port,
        redis_url=args.redis_url, policy=args.policy, launcher=args.launcher, ray_address=args.ray_address,
        ray_temp_dir=args.ray_temp_dir, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        lease_s=args.lease_s, peer_fetch=args.peer_fetch, engine_args=changed_engine_args(args),
        startup_timeout=args.startup_timeout,
        log_dir=args.log_dir, log_level=args.log_level)


def format_endpoints(cluster: LocalCluster) -> str:
    c = cluster.config
    lines = [f"kvweave cluster ready: {c.workers} worker(s) ({c.launcher}), model {c.model}",
             f"  grpc    {cluster.grpc_target}",
             f"  http    {cluster.http_url}/v1",
             f"  redis   {cluster.redis_url}"]
    lines += [f"  worker  {worker_id} {address}" for worker_id, address in cluster.worker_addresses.items()]
    lines += [f"  metrics {name} {url}" for name, url in cluster.metrics_urls.items()]
    lines.append(f"  logs    {cluster.log_dir}")
    return "\n".join(lines)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _supervise(cluster: LocalCluster) -> int:
    """Block until a signal (0) or the router's death (1); a worker's death is reported once."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        if not cluster.router_alive():
            print(f"error: {cluster.check()}", file=sys.stderr, flush=True)
            return 1
        failure = cluster.workers.check()
        if failure and failure not in reported:
            reported.add(failure)
            print(f"warning: {failure}\nthe router keeps serving with the other workers", file=sys.stderr, flush=True)


def router_env(args: argparse.Namespace) -> dict[str, str]:
    """The router settings `kvweave serve` hands its router through the environment."""
    from controlplane.router_main import CHUNK_SEPARATOR_ENV, MAX_CHUNKS_ENV

    env = {MAX_CHUNKS_ENV: str(args.max_chunks_per_request)}
    if args.chunk_separator:
        env[CHUNK_SEPARATOR_ENV] = args.chunk_separator
    return env


def run(args: argparse.Namespace) -> int:
    if args.chunk_separator == "":
        print("error: --chunk-separator must not be empty", file=sys.stderr)
        return 2
    try:
        cluster = LocalCluster(config_from_args(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.update(router_env(args))  # the router process inherits them
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cluster.start()
        print(format_endpoints(cluster), flush=True)
        return _supervise(cluster)
    except (_Terminated, KeyboardInterrupt):
        return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        cluster.stop()
        print("kvweave cluster stopped", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
