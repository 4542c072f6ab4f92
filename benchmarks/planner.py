"""`kvweave bench planner`: the SLA planner under a load step, against a static pool in the same run.

An embedded cluster (controlplane.cluster.LocalCluster: a redis-server, the router, one decode
worker process with `--threads-per-worker` threads, and with `--prefill-workers N` a prefill pool
that prefills every prompt and hands its KV to the decode worker) first serves one stream at a time for
`--unloaded-s` seconds: the client-side ITL p99 of that unloaded phase times `--target-factor` is
the ITL target of the run (so the target means the same on any CPU). Then the same load step twice:
`--concurrency` long generations kept in flight (each `--max-tokens` tokens, ignore_eos; a new one
starts when one ends) for `--step-intervals` intervals of `--interval-s` seconds:
- run A (baseline): no planner, the pool stays at 1 worker;
- run B: the planner of `kvweave serve --planner` (controlplane/serve_planner.py) scales the decode
  pool between 1 and `--max-replicas` toward the ITL target (its p99), every `--interval-s`, with
  `--decode-running` (default: the step's concurrency, so only the correction factor learned from
  the observed ITL makes it add a worker) and its other settings at their defaults. It runs for
  `--idle-intervals` intervals before the step.
Every streamed delta's gap from the previous one of its request (client side, through the router)
counts in the interval it ends in; intervals are counted from the step's start (the planner's own
intervals run at the same period, not in phase). At each interval's end the replica count is read
twice: the workers started (what the planner asked for) and those registered.

Results (BENCHMARKS.md's format):
- `itl_recovery_intervals`: in B, the first interval (1-based) from which every interval's ITL p99
  is under the target to the step's end (baseline: the 2 intervals the planner is allowed, ratio
  2 / value: >= 1 when met); run A's figure beside it (null: never);
- `itl_p99_after_recovery`: the ITL p99 over the intervals from B's recovery (from interval 3 when B
  did not recover) to the step's end, B against A over the same intervals (ratio A / B);
- `decode_tokens_per_s`: tokens streamed per second over the whole step, B against A.
Prompts: a short sentence per stream, or with `--context-tokens N` one shared document of N token
ids and a question of CONTEXT_QUESTION_TOKENS of each stream's own (loadgen's prefix-repetition
shape with one prefix; the prefix cache prefills the document once). Each stream sends the same
prompt every time; the unloaded phase sends the first stream's, so the target is measured on the
same prompt shape. With a document the router balances by load (`--policy`, default least_loaded
then: the default policy's cache affinity would keep every stream on the worker that holds it).
Why a document: on a CPU a decode step of a small model reads all its weights whatever the batch,
so with short prompts it grows little with the batch and splitting the batch hardly lowers ITL;
with long contexts each stream's attention reads its own KV and the step grows with the batch.
Measured in-process (SmolLM2-135M, 1 thread, AMD EPYC, median step): 39 / 89 / 114 ms at 1 / 8 /
16 short streams (16 vs 8: 1.29x), 49 / 140 / 226 ms on a ~1,720-token document (1.62x).
`config.run` holds the unloaded ITL, the target, each run's interval timeline (ITL p50/p99, tokens
per worker, replicas at the interval's end), B's planner decisions and replica changes (times from
the step's start: when the planner scaled up, when the added worker registered), and the changes
of B's workers after its first one while the load stays steady (`flaps`, 0 expected), and the cores
each process used over each step (`cores_used_a`, `cores_used_b`: CPU seconds / seconds; a worker
added during the step counts its start; `bench_process` is the load's client, and B's planner;
`machine` all cores busy, `other_processes` what of it was not this run's), which say whether a
second worker found a free core.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import aclosing
from dataclasses import asdict, dataclass

from benchmarks.report import Result, percentile, render, write_json
from controlplane.policies import LeastLoadedPolicy, make_policy
from controlplane.procs import cpu_seconds
from kvweave.defaults import DEFAULT_MODEL

TARGET_INTERVALS = 2
"""Intervals within which ITL p99 must be back under its target after the step (the planner's goal)."""
REPLICAS_POLL_S = 0.25
PROMPT = "Request {i}: write a long story about a lighthouse keeper and the sea."
CONTEXT_QUESTION_TOKENS = 16
"""Tokens of each stream's own after the shared document (with --context-tokens)."""


@dataclass
class PlannerBenchConfig:
    model: str = DEFAULT_MODEL
    threads_per_worker: int = 1
    num_blocks: int | None = None
    """KV blocks of each worker (None: the engine's default cache size)."""
    concurrency: int = 16
    """Generations in flight during the step."""
    max_tokens: int = 48
    interval_s: float = 20.0
    """The planner's interval, and the benchmark's."""
    idle_intervals: int = 1
    step_intervals: int = 6
    unloaded_s: float = 15.0
    target_factor: float = 2.0
    """ITL target = target_factor x the unloaded phase's client-side ITL p99."""
    max_replicas: int = 2
    decode_running: float | None = None
    """The planner's first estimate of requests per decode worker (None: `concurrency`)."""
    context_tokens: int = 0
    """Tokens of one document every prompt starts with, before the stream's own question (0: a short
    prompt per stream)."""
    prefill_workers: int = 0
    """Workers of a prefill pool, which the planner keeps toward its TTFT target (0: none, the decode
    workers prefill their own prompts). With a pool, the router hands every prompt's prefill to it
    (DISAGG_ROUTER_ARGS) and the decode workers pull its KV past the blocks they already hold: their
    steps are decode steps only, as in the disaggregated serving Dynamo's planner scales. Without
    one, a prompt's prefill runs inside a decode worker's step, and that step delays every stream
    the worker serves. The planner holds the prefill pool at N (its bounds: min = max = N) and scales
    the decode pool alone: the load step is a decode load, and on a small machine another prefill
    worker would take cores from the decode pool."""
    policy: str | None = None
    """The router's policy (None: least_loaded with a document, else the router's default). The
    default's cache affinity keeps streams that share a document on the worker that holds it (8 such
    streams over 2 workers all went to one), so a worker the planner adds would get no load."""


@dataclass
class StepRecord:
    """What the client saw during one load step: per delta (end time, gap, worker, tokens)."""

    start: float
    gaps: list[tuple[float, float]]
    tokens: list[tuple[float, str, int]]
    replicas: list[tuple[float, int, int]]
    """(time, workers started, workers registered) at the step's start and at each change."""
    cores: dict[str, float] | None = None
    """Process -> the cores it used over the step (CPU seconds / the step's seconds)."""

    def replicas_at(self, t: float) -> tuple[int, int]:
        return next((started, registered) for at, started, registered in reversed(self.replicas) if at <= t)


def stream_prompts(config: PlannerBenchConfig) -> list[dict]:
    """Each stream's prompt, as `generate` keyword arguments (see the module header)."""
    if not config.context_tokens:
        return [{"prompt": PROMPT.format(i=i)} for i in range(config.concurrency)]
    from benchmarks.mixed_load import vocab_token_range
    from kvweave.model_files import load_tokenizer
    from loadgen.workloads import PrefixRepetitionWorkload

    max_len = load_tokenizer(config.model).max_seq_len
    if config.context_tokens + CONTEXT_QUESTION_TOKENS + config.max_tokens > max_len:
        raise ValueError(f"--context-tokens {config.context_tokens} + {CONTEXT_QUESTION_TOKENS} question tokens + "
                         f"--max-tokens {config.max_tokens} exceed the model's context of {max_len} tokens")
    workload = PrefixRepetitionWorkload(prefix_len=config.context_tokens, suffix_len=CONTEXT_QUESTION_TOKENS,
                                        num_prefixes=1, output_len=config.max_tokens,
                                        token_range=vocab_token_range(config.model))
    sessions = itertools.islice(workload.sessions(), config.concurrency)
    return [{"token_ids": list(session.turns[0].token_ids)} for session in sessions]


async def _stream(client, prompt: dict, max_tokens: int, stop: asyncio.Event, record: StepRecord | None,
                  gaps: list[float]) -> None:
    """Generation after generation until `stop`, recording each delta's gap from the previous one."""
    while not stop.is_set():
        last = None
        async with aclosing(client.generate(**prompt, max_tokens=max_tokens, ignore_eos=True)) as deltas:
            async for delta in deltas:  # leaving it cancels the request
                now = time.monotonic()
                if stop.is_set():
                    break
                if not delta.token_ids:
                    continue
                if last is not None:
                    gaps.append(now - last)
                    if record is not None:
                        record.gaps.append((now, now - last))
                if record is not None:
                    record.tokens.append((now, delta.worker_id, len(delta.token_ids)))
                last = now


async def unloaded_itl(target: str, seconds: float, max_tokens: int, prompt: dict) -> list[float]:
    """Client-side ITL (s) of one stream at a time, sending `prompt`, for `seconds`."""
    import kvweave

    gaps: list[float] = []
    stop = asyncio.Event()
    async with kvweave.AsyncClient(target, timeout=600) as client:
        task = asyncio.create_task(_stream(client, prompt, max_tokens, stop, None, gaps))
        await asyncio.sleep(seconds)
        stop.set()
        await task
    return gaps


async def load_step(cluster, config: PlannerBenchConfig, prompts: list[dict]) -> StepRecord:
    """`concurrency` streams (one per prompt) for `step_intervals` intervals, noting every change of
    the decode workers started and registered (read every REPLICAS_POLL_S)."""
    import redis.asyncio as aioredis

    import kvweave
    from kvweave.registry import Registry

    stop = asyncio.Event()
    redis = aioredis.Redis.from_url(cluster.redis_url)
    registry = Registry(redis, key=None)

    async def count() -> tuple[int, int]:
        started = sum(1 for r in cluster.worker_roles.values() if r == "decode")
        return started, sum(1 for w in await registry.list_workers() if w.role == "decode")

    async def watch_replicas() -> None:
        while not stop.is_set():
            await asyncio.sleep(REPLICAS_POLL_S)
            now, counts = time.monotonic(), await count()
            if record.replicas[-1][1:] != counts:
                record.replicas.append((now, *counts))

    try:
        counts = await count()
        cpu_start = cluster_cpu_seconds(cluster)
        record = StepRecord(time.monotonic(), [], [], [])
        record.replicas.append((record.start, *counts))
        async with kvweave.AsyncClient(cluster.grpc_target, timeout=600) as client:
            tasks = [asyncio.create_task(watch_replicas())]
            tasks += [asyncio.create_task(_stream(client, prompt, config.max_tokens, stop, record, []))
                      for prompt in prompts]
            await asyncio.sleep(max(0.0, record.start + config.step_intervals * config.interval_s - time.monotonic()))
            cpu_end, seconds = cluster_cpu_seconds(cluster), time.monotonic() - record.start
            cores = {name: (cpu - cpu_start.get(name, 0.0)) / seconds for name, cpu in cpu_end.items()}
            cores["other_processes"] = max(0.0, 2 * cores["machine"] - sum(cores.values()))  # machine - ours
            record.cores = {name: round(value, 3) for name, value in cores.items()}
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        await redis.aclose()
    return record


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine spent busy so far (all processes: /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(cluster) -> dict[str, float]:
    """CPU seconds so far of the cluster's processes, of this one (the load's client; in run B also
    the planner's thread) and of the whole machine (`machine`)."""
    pids = {"router": cluster.router.pid, "redis": cluster.redis.proc.pid,
            **{worker_id: cluster.workers.proc(worker_id).pid for worker_id in cluster.worker_ids}}
    own = os.times()
    return {**{name: cpu_seconds(pid) for name, pid in pids.items()}, "bench_process": own.user + own.system,
            "machine": machine_busy_seconds()}


def timeline(record: StepRecord, config: PlannerBenchConfig) -> list[dict]:
    """Per interval: ITL p50/p99 (ms), tokens per worker, replicas started and registered."""
    gaps: dict[int, list[float]] = defaultdict(list)
    tokens: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    index = lambda t: int((t - record.start) // config.interval_s) + 1  # noqa: E731
    for t, gap in record.gaps:
        gaps[index(t)].append(gap)
    for t, worker_id, n in record.tokens:
        tokens[index(t)][worker_id] += n
    rows = []
    for k in range(1, config.step_intervals + 1):
        started, registered = record.replicas_at(record.start + k * config.interval_s)
        g = gaps.get(k, [])
        rows.append({"interval": k, "itl_p50_ms": _ms(percentile(g, 50)) if g else None,
                     "itl_p99_ms": _ms(percentile(g, 99)) if g else None, "num_gaps": len(g),
                     "tokens_by_worker": dict(sorted(tokens[k].items())), "replicas_started": started,
                     "replicas_registered": registered})
    return rows


def recovery_interval(rows: list[dict], target_ms: float) -> int | None:
    """The first interval from which every interval's ITL p99 is under the target (None: never)."""
    first = None
    for row in rows:
        if row["itl_p99_ms"] is not None and row["itl_p99_ms"] <= target_ms:
            first = first or row["interval"]
        else:
            first = None
    return first


def phase_p99_ms(record: StepRecord, config: PlannerBenchConfig, first: int) -> float:
    """ITL p99 (ms) over the gaps from interval `first` to the step's end."""
    since = record.start + (first - 1) * config.interval_s
    end = record.start + config.step_intervals * config.interval_s
    return _ms(percentile([g for t, g in record.gaps if since <= t < end], 99))


def tokens_per_s(record: StepRecord, config: PlannerBenchConfig) -> float:
    end = record.start + config.step_intervals * config.interval_s
    return sum(n for t, _, n in record.tokens if t < end) / (config.step_intervals * config.interval_s)


def flaps(events: list[dict]) -> int:
    """Changes of the workers started after the first change (the load is steady through the step)."""
    started = [e["started"] for e in events]
    return max(0, sum(1 for a, b in zip(started, started[1:]) if a != b) - 1)


DISAGG_ROUTER_ARGS = {"disagg_threshold_tokens": 1, "disagg_handoff_margin": 1e6}
"""With a prefill pool: every prompt with an uncached token is prefilled there, whatever a local
prefill would cost (the router's estimate counts the prefill alone, not the decode steps it delays)."""


def engine_args(config: PlannerBenchConfig) -> dict:
    return {"num_threads": config.threads_per_worker,
            **({"num_blocks": config.num_blocks} if config.num_blocks else {})}


def run_bench(config: PlannerBenchConfig, prompts: list[dict], log=print) -> tuple[list[Result], dict]:
    from controlplane.cluster import LocalCluster
    from controlplane.serve_planner import ServePlanner, serve_planner_config

    loadavg_start = round(os.getloadavg()[0], 2)
    with LocalCluster(model=config.model, workers=0, decode_workers=1, prefill_workers=config.prefill_workers,
                      insecure=True, startup_timeout=900, engine_args=engine_args(config), policy=config.policy,
                      router_args=DISAGG_ROUTER_ARGS if config.prefill_workers else {}) as cluster:
        warm_up = min(2.0, config.unloaded_s)  # with a document: its prefill, then in the prefix cache
        asyncio.run(unloaded_itl(cluster.grpc_target, warm_up, config.max_tokens, prompts[0]))
        unloaded = asyncio.run(unloaded_itl(cluster.grpc_target, config.unloaded_s, config.max_tokens, prompts[0]))
        unloaded_p99 = _ms(percentile(unloaded, 99))
        target_ms = config.target_factor * unloaded_p99
        log(f"unloaded ITL p50 {_ms(percentile(unloaded, 50)):.1f} ms, p99 {unloaded_p99:.1f} ms: "
            f"target {target_ms:.1f} ms")
        log(f"run A: static pool of 1, {config.concurrency} streams for {config.step_intervals} x "
            f"{config.interval_s:g} s")
        step_a = asyncio.run(load_step(cluster, config, prompts))
        time.sleep(2.0)  # the aborted generations drain
        planner = ServePlanner(cluster, serve_planner_config(
            cluster.config, itl_target_ms=target_ms, quantile=0.99, min_replicas=1,
            max_replicas=config.max_replicas, interval_s=config.interval_s,
            prefill_min_replicas=config.prefill_workers or None, prefill_max_replicas=config.prefill_workers or None,
            decode_running=config.decode_running or float(config.concurrency))).start()
        try:
            time.sleep(config.idle_intervals * config.interval_s)
            log("run B: the same step with the planner")
            step_b = asyncio.run(load_step(cluster, config, prompts))
        finally:
            planner.stop()
        decisions = [{"t_s": round(t - step_b.start, 2), "pool": d.role, "from": d.current_replicas,
                      "to": d.target_replicas, "reason": d.reason, "detail": d.detail}
                     for t, d in planner.loop.decisions]
    results, details = report(config, unloaded, target_ms, step_a, step_b, decisions)
    return results, {"loadavg_1min_at_start": loadavg_start, **details}


def report(config: PlannerBenchConfig, unloaded: list[float], target_ms: float, step_a: StepRecord,
           step_b: StepRecord, decisions: list[dict]) -> tuple[list[Result], dict]:
    rows_a, rows_b = timeline(step_a, config), timeline(step_b, config)
    recovered_a, recovered_b = recovery_interval(rows_a, target_ms), recovery_interval(rows_b, target_ms)
    first = recovered_b or TARGET_INTERVALS + 1
    first = min(first, config.step_intervals)
    up = next((d for d in decisions if d["pool"] == "decode" and d["reason"] == "scale_up"), None)
    events = [{"t_s": round(t - step_b.start, 2), "started": started, "registered": registered}
              for t, started, registered in step_b.replicas]
    registered_at = next((e["t_s"] for e in events if e["registered"] > events[0]["registered"]), None)
    results = [
        Result("itl_recovery_intervals", recovered_b or config.step_intervals, "intervals", "target_intervals",
               TARGET_INTERVALS, higher_is_better=False,
               extra={"recovered": recovered_b is not None, "static_pool_recovery_intervals": recovered_a,
                      "itl_target_ms": round(target_ms, 2)}),
        Result("itl_p99_after_recovery", phase_p99_ms(step_b, config, first), "ms", "static_pool_1",
               phase_p99_ms(step_a, config, first), higher_is_better=False,
               extra={"intervals": [first, config.step_intervals]}),
        Result("decode_tokens_per_s", tokens_per_s(step_b, config), "tok/s", "static_pool_1",
               tokens_per_s(step_a, config)),
    ]
    details = {"unloaded_itl_p50_ms": round(_ms(percentile(unloaded, 50)), 2),
               "unloaded_itl_p99_ms": round(_ms(percentile(unloaded, 99)), 2), "unloaded_num_gaps": len(unloaded),
               "itl_target_ms": round(target_ms, 2), "recovery_intervals": {"a": recovered_a, "b": recovered_b},
               "scale_up_at_s": up and up["t_s"], "added_worker_registered_at_s": registered_at,
               "cores_used_a": step_a.cores, "cores_used_b": step_b.cores, "replica_changes_b": events, "flaps": flaps(events), "timeline_a": rows_a, "timeline_b": rows_b,
               "decisions_b": decisions}
    return results, details


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def add_parser(bsub: argparse._SubParsersAction) -> None:
    d = PlannerBenchConfig()
    p = bsub.add_parser("planner", help="the SLA planner under a load step: ITL p99 recovery in intervals, "
                                        "against a static pool of one decode worker")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: 1-s intervals, 2 step intervals, 4 streams of 8 tokens (with a tiny --model)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks of each worker (default: the engine's)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="generations in flight during the step")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens of each generation")
    p.add_argument("--interval-s", type=float, default=d.interval_s, help="the planner's interval and the report's")
    p.add_argument("--idle-intervals", type=int, default=d.idle_intervals, help="planner intervals before the step")
    p.add_argument("--step-intervals", type=int, default=d.step_intervals, help="intervals of the load step")
    p.add_argument("--unloaded-s", type=float, default=d.unloaded_s, help="seconds of one stream for the unloaded ITL")
    p.add_argument("--target-factor", type=float, default=d.target_factor,
                   help="ITL target = this x the unloaded ITL p99")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas)
    p.add_argument("--decode-running", type=float, default=None,
                   help="the planner's first estimate of requests per decode worker (default: --concurrency)")
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, metavar="N",
                   help="start every prompt with one shared document of N tokens (then each stream's own "
                        f"{CONTEXT_QUESTION_TOKENS}), so a decode step grows with the batch; 0: short prompts")
    p.add_argument("--prefill-workers", type=int, default=d.prefill_workers, metavar="N",
                   help="a prefill pool of N workers that prefills every prompt (its KV handed to the decode "
                        "workers), held at N while the planner scales the decode pool; 0: the decode "
                        "workers prefill their own")
    p.add_argument("--policy", default=None, help="the router's policy (default: least_loaded with "
                                                  "--context-tokens, else the router's default)")
    p.set_defaults(func=run)


QUICK = {"concurrency": 4, "max_tokens": 8, "interval_s": 1.0, "idle_intervals": 1, "step_intervals": 2,
         "unloaded_s": 1.0}


def run(args: argparse.Namespace) -> int:
    config = PlannerBenchConfig(**{k: getattr(args, k) for k in PlannerBenchConfig.__dataclass_fields__})
    if args.quick:
        config = PlannerBenchConfig(**{**asdict(config), **QUICK})
    if (config.concurrency < 1 or config.max_tokens < 2 or not config.interval_s > 0 or config.step_intervals < 1
            or config.idle_intervals < 0 or not config.unloaded_s > 0 or not config.target_factor > 0
            or config.max_replicas < 1 or config.threads_per_worker < 1 or (config.num_blocks or 1) < 1
            or (config.decode_running is not None and not config.decode_running > 0) or config.context_tokens < 0
            or config.prefill_workers < 0):
        print("error: --concurrency, --step-intervals, --max-replicas, --threads-per-worker and --num-blocks must be >= 1, "
              "--max-tokens >= 2, --idle-intervals, --context-tokens and --prefill-workers >= 0, --interval-s, --unloaded-s, "
              "--target-factor and --decode-running > 0", file=sys.stderr)
        return 2
    if config.policy is None and config.context_tokens:
        config.policy = LeastLoadedPolicy.name
    try:
        if config.policy is not None:
            make_policy(config.policy)  # PolicyError naming the valid ones
        prompts = stream_prompts(config)
    except ValueError as e:  # an unknown policy, a context longer than the model's, a model not found
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, details = run_bench(config, prompts, log=lambda m: print(m, file=sys.stderr, flush=True))
    cfg = asdict(config)
    print(render("planner", cfg, results))
    print(json.dumps({k: v for k, v in details.items() if not k.startswith("timeline")}, indent=1))
    if args.json:
        write_json(args.json, "planner", {**cfg, "run": details}, results)
    return 0
