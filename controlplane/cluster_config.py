"""What the cluster and its worker launchers share: the cluster's configuration, its error, and how
one worker's id, role, settings and command line derive from them.

A cluster has up to four pools (issues 13 and 20): colocated workers (`workers`, each prefills and
decodes its own requests), prefill workers, decode workers and encode workers (images of
vision-language requests); ids say the role (`worker-<i>`, `prefill-<i>`, `decode-<i>`,
`encode-<i>`). Whether a request is prefilled remotely is the router's decision
(controlplane/disagg.py).

`controlplane.cluster.LocalCluster` composes Redis, the router and a launcher
(`controlplane.cluster.LocalWorkers`: `kvweave worker` processes, or
`controlplane.ray_launcher.RayWorkers`: Ray actors); the launchers need this much of the cluster
and nothing else, so it is its own module below both.
"""
from __future__ import annotations

import itertools
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.procs import LOCALHOST
from controlplane.supervisor import RestartPolicy
from kvweave.config_flags import flag
from kvweave.defaults import DEFAULT_MODEL

LAUNCHERS = ("local", "ray")
ID_PREFIXES = {"colocated": "worker", "prefill": "prefill", "decode": "decode", "encode": "encode"}
"""Role -> the prefix of its workers' ids, for the roles a cluster starts."""


ENCODE_DRAM_CACHE_GB = 1.0
"""Host tier of an encode worker when the engine flags give none (its embeddings live there)."""


class ClusterError(RuntimeError):
    """The cluster could not start (a child exited, or it was not ready in time); the message has its logs."""


@dataclass
class ClusterConfig:
    workers: int = field(default=2, metadata=flag(metavar="N"))
    """Number of colocated workers (each prefills and decodes its own requests)."""
    prefill_workers: int = field(default=0, metadata=flag(metavar="N"))
    """Number of prefill workers (they prefill requests the router hands on to a decode worker)."""
    decode_workers: int = field(default=0, metadata=flag(metavar="N"))
    """Number of decode workers (they decode requests prefilled elsewhere, and prefill the others themselves)."""
    encode_workers: int = field(default=0, metadata=flag(metavar="N"))
    """Number of encode workers (vision-language models: they encode the images of requests, and the
    prefill or colocated workers fetch the embeddings; each gets a host tier of `ENCODE_DRAM_CACHE_GB`
    unless the engine flags give one)."""
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
    ray_namespace: str = "kvweave"
    """Ray namespace of the worker actors, each named `kvweave-<worker id>` (`kvweave-decode-1`), so
    that another driver (`kvweave planner --connector ray`) can find and count them."""
    ray_temp_dir: str | None = None
    """Temp dir of a local Ray cluster (keep it short: Ray's socket paths must fit 107 bytes)."""
    gpus_per_worker: float = 0.0
    """GPUs of each worker: Ray actors reserve them; local workers get `CUDA_VISIBLE_DEVICES` (0 with
    GPUs present: one each; k >= 1: k each, a tensor-parallel group; 0 < k < 1: 1/k workers share one)."""
    gpus: str | None = None
    """GPU ids local workers are given, comma-separated (default: the inherited CUDA_VISIBLE_DEVICES,
    else every /dev/nvidiaN of this machine); "" for none."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray worker actor reserves."""
    cpu_bind: bool = True
    """Give each local worker its own CPU cores (`--cpu-cores`, as many as its threads: `num_threads`,
    else this machine's cores / the workers) when the workers fit and have no GPU; the router, Redis
    and clients run on any core. Off, or when they do not fit, the scheduler places them."""
    lease_s: float | None = None
    """Registry lease of the workers and the router, seconds (None: their default)."""
    peer_fetch: bool = True
    """Workers fetch the KV and image embeddings they lack from peers the KV index lists (`kvweave worker
    --peer-fetch`); off, they still pull prefill handoffs and the embeddings whose holder the router names."""
    max_waiting: int = 256
    """Per worker: requests waiting for their first token beyond which new ones are refused with
    RESOURCE_EXHAUSTED (`kvweave worker --max-waiting`; 0: no limit)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Engine settings of every worker, by EngineConfig field name (e.g. {"num_blocks": 256})."""
    router_args: dict[str, Any] = field(default_factory=dict)
    """Router settings, by RouterConfig field name (e.g. {"disagg_threshold_tokens": 256}), and the
    router's API keys and TLS files by ServeOptions field name (api_keys_file, tls_cert_file, tls_key_file)."""
    startup_timeout: float = 300.0
    """Seconds to wait for every worker and the router to be ready."""
    log_dir: str | None = None
    """Folder for the children's logs (None: a temp folder removed on stop)."""
    log_level: str | None = None
    """--log-level of the children."""
    restart: bool = True
    """Restart a worker process, the router or the embedded redis-server that dies (with backoff)."""
    max_restarts: int = 10
    """Restarts of one process in a row (without `restart_stable_s` of uptime between) before giving
    up on it; 0: never give up."""
    restart_backoff_s: float = 0.5
    """Delay before restarting a process that died; doubles with each crash in a row (at most 30 s)."""
    restart_stable_s: float = 30.0
    """Uptime after which a restarted process counts as stable (its backoff and count reset)."""
    cluster_secret_file: str | None = None
    """File holding the cluster secret the router and workers share (None: a fresh random one for
    this cluster, mode 0600 in a private folder removed on stop). See docs/security.md."""
    redis_password_file: str | None = None
    """File holding the password of the `redis_url` Redis (the private redis-server gets a fresh one)."""
    insecure: bool = False
    """Run the cluster open: no cluster secret, no Redis password (for trusted test setups only)."""

    def __post_init__(self) -> None:
        self._check_pools()
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.launcher!r}; valid: {', '.join(LAUNCHERS)}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0 or self.startup_timeout <= 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be >= 0, startup_timeout > 0")
        self.restart_policy  # validates the restart settings
        if "model" in self.engine_args:
            raise ValueError("give the model as `model`, not in engine_args")

    def _check_pools(self) -> None:
        counts = {"workers": self.workers, "prefill_workers": self.prefill_workers,
                  "decode_workers": self.decode_workers, "encode_workers": self.encode_workers}
        if negative := [f"{name}={n}" for name, n in counts.items() if n < 0]:
            raise ValueError(f"worker counts must be >= 0, got {', '.join(negative)}")
        if self.num_workers < 1:
            raise ValueError("a cluster needs at least one worker: workers, prefill_workers and decode_workers "
                             "are all 0")
        for name in ("prefill_workers", "encode_workers"):
            if getattr(self, name) and not (self.workers or self.decode_workers):
                raise ValueError(f"{name}={getattr(self, name)} without a decode or colocated worker: "
                                 "nothing could decode their requests (add decode_workers or workers)")

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks of each worker (its engine's `tensor_parallel_size`)."""
        return int(self.engine_args.get("tensor_parallel_size", 1))

    @property
    def worker_gpus(self) -> float:
        """GPUs each local worker gets: `gpus_per_worker`, else one per tensor-parallel rank (0: one each)."""
        tp = self.tensor_parallel_size
        return self.gpus_per_worker or (float(tp) if tp > 1 else 0.0)

    @property
    def worker_cpus(self) -> float:
        """CPUs each Ray worker actor reserves: `cpus_per_worker`, at least one per tensor-parallel rank
        (a worker's ranks are processes of its actor, so one actor reservation holds the group)."""
        return max(self.cpus_per_worker, float(self.tensor_parallel_size))

    @property
    def role_counts(self) -> dict[str, int]:
        """Role -> number of workers, for the roles that have any (colocated, prefill, decode, encode in
        that order)."""
        counts = {"colocated": self.workers, "prefill": self.prefill_workers, "decode": self.decode_workers,
                  "encode": self.encode_workers}
        return {role: n for role, n in counts.items() if n}

    @property
    def restart_policy(self) -> RestartPolicy:
        """The supervisor's policy from the `restart*` fields."""
        return RestartPolicy(enabled=self.restart, max_restarts=self.max_restarts, backoff_s=self.restart_backoff_s,
                             max_backoff_s=max(30.0, self.restart_backoff_s), stable_s=self.restart_stable_s)

    @property
    def num_workers(self) -> int:
        """Workers of every role."""
        return self.workers + self.prefill_workers + self.decode_workers + self.encode_workers


def worker_roles(config: ClusterConfig) -> dict[str, str]:
    """Worker id -> role: `worker-<i>` (colocated), `prefill-<i>`, `decode-<i>`, `encode-<i>`. With an external
    `redis_url` each id gets a random suffix, since other clusters' workers may register there."""
    return {new_worker_id(config, role, i): role for role, n in config.role_counts.items() for i in range(n)}


def new_worker_id(config: ClusterConfig, role: str, i: int) -> str:
    """The id of the `i`-th worker of `role` (see `worker_roles`)."""
    base = f"{ID_PREFIXES[role]}-{i}"
    return base if config.redis_url is None else f"{base}-{secrets.token_hex(3)}"


def next_worker_id(config: ClusterConfig, roles: dict[str, str], role: str) -> str:
    """The id of one more worker of `role` beside `roles` (worker id -> role): the lowest free index.
    Raises ValueError for a role a cluster does not start."""
    if role not in ID_PREFIXES:
        raise ValueError(f"unknown role {role!r}; valid: {', '.join(ID_PREFIXES)}")
    taken = {w.split("-")[1] for w, r in roles.items() if r == role}
    return new_worker_id(config, role, next(i for i in itertools.count() if str(i) not in taken))


def heartbeat_s(lease_s: float) -> float:
    """A worker's heartbeat period under a lease of `lease_s`: a third of it, at most a second."""
    return min(1.0, lease_s / 3)


def worker_engine_args(engine_args: dict[str, Any], worker_id: str, role: str = "colocated") -> dict[str, Any]:
    """One worker's engine settings: an SSD cache directory is split per worker (a slab file
    belongs to one process); an encode worker without a host tier gets one (it keeps its
    embeddings there for its peers)."""
    if engine_args.get("ssd_cache_dir"):
        engine_args = {**engine_args, "ssd_cache_dir": str(Path(engine_args["ssd_cache_dir"]) / worker_id)}
    if role == "encode" and engine_args.get("dram_cache_gb") is None:
        engine_args = {**engine_args, "dram_cache_gb": ENCODE_DRAM_CACHE_GB}
    return engine_args


def shared_engine_args(engine_args: dict[str, Any], worker_id: str) -> dict[str, Any]:
    """The cluster's engine settings from those of its worker `worker_id` (`worker_engine_args` undone)."""
    ssd_cache_dir = engine_args.get("ssd_cache_dir")
    if ssd_cache_dir and Path(ssd_cache_dir).name == worker_id:
        return {**engine_args, "ssd_cache_dir": str(Path(ssd_cache_dir).parent)}
    return engine_args


def field_flags(values: dict[str, Any]) -> list[str]:
    """Config field values (EngineConfig's for a worker, RouterConfig's for the router) as command-line flags."""
    flags: list[str] = []
    for name, value in values.items():
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def cli_command(config: ClusterConfig, *args: str) -> list[str]:
    """`python -m cli [--log-level L] ARGS...` (the `kvweave` command) with this interpreter."""
    level = ["--log-level", config.log_level] if config.log_level else []
    return [sys.executable, "-m", "cli", *level, *args]
