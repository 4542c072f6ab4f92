"""`kvweave bench soak`: N minutes (default 10) of mixed load on an embedded cluster, with the resident
memory of every process at the start and at the end.

An embedded cluster (controlplane.cluster.LocalCluster: a redis-server, the router, `--workers`
worker processes) serves loadgen's seeded `mixed` workload (long prompts with few output tokens
among short chat turns) at `--rate` requests per second (Poisson, at most `--max-concurrency` in
flight) for `--duration-s` seconds. After a warm-up run (so that first-use allocations are not
counted as growth), the RSS of every process is read from /proc at the start and at the end, and
sampled every `--sample-s` seconds in between (`rss_samples_mib` in the JSON).

Results (BENCHMARKS.md's format): per process `rss_<name>` in MiB, its start value as the baseline
(ratio = start / end: 1.0 is flat, below 1 it grew); `requests_ok` against the requests sent
(ratio: the share that succeeded); the restarts the supervisor made are in the config block.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass

from benchmarks.mixed_load import length_range, mixed_workload
from benchmarks.report import Result, render, write_json
from kvweave.defaults import DEFAULT_MODEL

MIB = 1 << 20


@dataclass
class SoakConfig:
    model: str = DEFAULT_MODEL
    workers: int = 2
    duration_s: float = 600.0
    warmup_s: float = 20.0
    rate: float = 1.0
    """Requests per second (Poisson)."""
    max_concurrency: int = 8
    long_fraction: float = 0.1
    long_input_len: tuple[int, int] = (1000, 2000)
    long_output_len: int = 8
    short_input_len: tuple[int, int] = (32, 128)
    short_output_len: int = 64
    threads_per_worker: int = 1
    request_timeout_s: float = 300.0
    seed: int = 0
    sample_s: float = 60.0
    """How often the RSS of every process is sampled during the soak (to tell growth that levels off
    from growth that goes on)."""


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return 0.0


def _processes(cluster) -> dict[str, int]:
    """Process name -> its pid now (a process the supervisor restarted has a new one)."""
    procs = {"router": cluster.router.pid}
    if cluster.redis is not None:
        procs["redis"] = cluster.redis.proc.pid
    procs.update({worker_id: proc.pid for worker_id, proc in zip(cluster.worker_ids, cluster.workers.procs)})
    return procs


async def _drive(cluster, config: SoakConfig, duration_s: float):
    from loadgen.backends import GrpcBackend, SendOptions
    from loadgen.runner import RunConfig, Runner

    workload = mixed_workload(config)
    backend = GrpcBackend(cluster.grpc_target, options=SendOptions(request_timeout=config.request_timeout_s))
    await backend.connect()
    try:
        run_config = RunConfig(request_rate=config.rate, max_concurrency=config.max_concurrency, num_requests=None,
                               duration=duration_s, seed=config.seed, progress=False)
        return await Runner(workload, backend, run_config, log=lambda _: None).run()
    finally:
        await backend.close()


def run_bench(config: SoakConfig, log=print) -> tuple[list[Result], dict]:
    from controlplane.cluster import LocalCluster

    with LocalCluster(model=config.model, workers=config.workers, startup_timeout=600,
                      engine_args={"num_threads": config.threads_per_worker}) as cluster:
        if config.warmup_s > 0:
            log(f"warm-up: {config.warmup_s:.0f} s")
            asyncio.run(_drive(cluster, config, config.warmup_s))
        start = {name: _rss_mib(pid) for name, pid in _processes(cluster).items()}
        log(f"soak: {config.duration_s:.0f} s at {config.rate} req/s; RSS at start (MiB): {start}")
        t0 = time.monotonic()
        samples: list[dict] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(config.sample_s):
                rss = {name: round(_rss_mib(pid), 1) for name, pid in _processes(cluster).items()}
                samples.append({"t_s": round(time.monotonic() - t0), **rss})

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        sampler.start()
        try:
            result = asyncio.run(_drive(cluster, config, config.duration_s))
        finally:
            stop.set()
            sampler.join()
        elapsed = time.monotonic() - t0
        end = {name: _rss_mib(pid) for name, pid in _processes(cluster).items()}
        restarts = cluster.restarts
    records = result.records
    ok = sum(r.ok for r in records)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    results = [Result(f"rss_{name}", end[name], "MiB", "rss_at_start", start[name], higher_is_better=False)
               for name in start]
    results.append(Result("requests_ok", ok, "requests", "requests_sent", len(records),
                          extra={"failed_by_kind": errors}))
    details = {"elapsed_s": round(elapsed, 1), "requests_sent": len(records), "requests_ok": ok,
               "failed_by_kind": errors, "rss_start_mib": start, "rss_end_mib": end, "rss_samples_mib": samples,
               "restarts": restarts}
    return results, details


def add_parser(bsub: argparse._SubParsersAction) -> None:
    d = SoakConfig()
    p = bsub.add_parser("soak", help="minutes of mixed load on an embedded cluster: RSS of every process at the "
                                     "start and the end, requests ok/failed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--model", default=d.model)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="seconds of load (default 10 minutes)")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="seconds of load before the start RSS")
    p.add_argument("--rate", type=float, default=d.rate, help="requests per second (Poisson)")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency)
    p.add_argument("--long-fraction", type=float, default=d.long_fraction)
    p.add_argument("--long-input-len", type=length_range("--long-input-len"), default=d.long_input_len, metavar="LO:HI")
    p.add_argument("--long-output-len", type=int, default=d.long_output_len)
    p.add_argument("--short-input-len", type=length_range("--short-input-len"), default=d.short_input_len, metavar="LO:HI")
    p.add_argument("--short-output-len", type=int, default=d.short_output_len)
    p.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sample-s", type=float, default=d.sample_s, help="seconds between RSS samples during the soak")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.workers < 1 or not args.duration_s > 0 or args.warmup_s < 0 or not args.rate > 0
            or args.max_concurrency < 1 or not 0 <= args.long_fraction <= 1 or not args.sample_s > 0):
        print("error: --workers and --max-concurrency must be >= 1, --duration-s and --rate > 0, --warmup-s >= 0, "
              "--long-fraction in [0, 1], --sample-s > 0", file=sys.stderr)
        return 2
    config = SoakConfig(**{k: getattr(args, k) for k in SoakConfig.__dataclass_fields__ if hasattr(args, k)})
    results, details = run_bench(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    cfg = asdict(config)
    print(render("soak", cfg, results))
    print(json.dumps(details, indent=1))
    if args.json:
        write_json(args.json, "soak", {**cfg, "run": details}, results)
    return 0
