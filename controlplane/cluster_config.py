"""What the cluster and its worker launchers share: the cluster's configuration, its error, and how
one worker's settings and command line derive from them.

`controlplane.cluster.LocalCluster` composes Redis, the router and a launcher
(`controlplane.cluster.LocalWorkers`: `kvweave worker` processes, or
`controlplane.ray_launcher.RayWorkers`: Ray actors); the launchers need this much of the cluster
and nothing else, so it is its own module below both.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.procs import LOCALHOST
from kvweave.defaults import DEFAULT_MODEL

LAUNCHERS = ("local", "ray")


class ClusterError(RuntimeError):
    """The cluster could not start (a child exited, or it was not ready in time); the message has its logs."""


@dataclass
class ClusterConfig:
    workers: int = 2
    """Number of workers."""
    model: str = DEFAULT_MODEL
    """Model of every worker and of the router's tokenizer."""
    host: str = LOCALHOST
    """Interface the router and local workers bind to."""
    port: int = 0
    """Router gRPC port (0: a free port)."""
    http_port: int = 0
    """Router OpenAI HTTP port (0: a free port)."""
    redis_url: str | None = None
    """An existing Redis; None starts a private redis-server."""
    policy: str | None = None
    """Routing policy (None: the router's default)."""
    launcher: str = "local"
    """local (worker processes) | ray (worker actors)."""
    ray_address: str | None = None
    """Ray cluster to join (None: start a local one); its nodes must reach `redis_url`."""
    ray_temp_dir: str | None = None
    """Temp dir of a local Ray cluster (keep it short: Ray's socket paths must fit 107 bytes)."""
    gpus_per_worker: float = 0.0
    """GPUs each Ray worker actor reserves."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray worker actor reserves."""
    lease_s: float | None = None
    """Registry lease of the workers and the router, seconds (None: their default)."""
    peer_fetch: bool = True
    """Workers fetch the KV they lack from peers that hold it (`kvweave worker --peer-fetch`)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Engine settings of every worker, by EngineConfig field name (e.g. {"num_blocks": 256})."""
    startup_timeout: float = 300.0
    """Seconds to wait for every worker and the router to be ready."""
    log_dir: str | None = None
    """Folder for the children's logs (None: a temp folder removed on stop)."""
    log_level: str | None = None
    """--log-level of the children."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.launcher!r}; valid: {', '.join(LAUNCHERS)}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0 or self.startup_timeout <= 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be >= 0, startup_timeout > 0")
        if "model" in self.engine_args:
            raise ValueError("give the model as `model`, not in engine_args")


def worker_engine_args(engine_args: dict[str, Any], worker_id: str) -> dict[str, Any]:
    """One worker's engine settings: an SSD cache directory is split per worker (a slab file
    belongs to one process)."""
    if engine_args.get("ssd_cache_dir"):
        return {**engine_args, "ssd_cache_dir": str(Path(engine_args["ssd_cache_dir"]) / worker_id)}
    return engine_args


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """EngineConfig field values as the worker's command-line flags."""
    flags: list[str] = []
    for name, value in engine_args.items():
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def cli_command(config: ClusterConfig, *args: str) -> list[str]:
    """`python -m cli [--log-level L] ARGS...` (the `kvweave` command) with this interpreter."""
    level = ["--log-level", config.log_level] if config.log_level else []
    return [sys.executable, "-m", "cli", *level, *args]
