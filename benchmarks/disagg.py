"""`kvweave bench disagg`: prefill/decode disaggregation against colocated serving, on equal resources.

The same seeded `mixed` workload (loadgen/workloads/synthetic.py: long prompts with few output
tokens, and many short decode-heavy requests; the same prompts and the same Poisson arrival times)
is sent at the same rate, through the real serving path (router, gRPC, worker processes), to two
embedded clusters (controlplane.cluster.LocalCluster) whose workers have the same engine settings
and threads, chunked prefill on:
- colocated: 2 colocated workers (the baseline);
- disaggregated: 1 prefill + 1 decode worker, the router deciding per request (controlplane/disagg.py);
and a third run of the disaggregated cluster in which the prefill worker is killed (SIGKILL) half-way
through, to count lost requests. Reported, with the colocated baseline from the same run:
- `itl_p99_disagg`, `ttft_p50_disagg` (loadgen's figures over all successful requests);
- `goodput_disagg`: requests per second meeting the SLO (`--slo-ttft-ms`, `--slo-tpot-ms`);
- `short_no_handoff_share`: of the prompts below the decision's threshold (the short class), the
  share served with no handoff;
- `handoff_time_vs_prefill`: the decode workers' time pulling handoffs (kvweave_worker_handoff_seconds)
  against the router's remote prefill time (kvweave_router_remote_prefill_seconds), summed;
- `completed_with_prefill_killed`: requests completed out of those sent when the prefill worker dies.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.request
from dataclasses import asdict, dataclass

from benchmarks.mixed_load import length_range, mixed_workload
from benchmarks.report import Result, environment, render, write_json
from kvweave.defaults import DEFAULT_MODEL

WARMUP_PROMPT_TOKENS = 700
"""Every worker first serves one prompt this long directly (its first steps load kernels and
allocate; a prefill worker gets no request through the router before the first long one)."""


@dataclass
class DisaggBenchConfig:
    model: str = DEFAULT_MODEL
    requests: int = 120
    rate: float = 1.1
    """Requests per second (Poisson): about where the colocated cluster starts missing the SLO."""
    long_fraction: float = 0.05
    long_input_len: tuple[int, int] = (4000, 6000)
    long_output_len: int = 8
    short_input_len: tuple[int, int] = (32, 128)
    short_output_len: int = 128
    threads_per_worker: int = 1
    max_num_batched_tokens: int = 512
    slo_ttft_ms: float = 2500.0
    slo_tpot_ms: float = 150.0
    """DistServe's chatbot SLO (TTFT 2.5 s, TPOT 0.15 s)."""
    seed: int = 1
    """The rate and the long share were chosen on seed 0 (other prompts, lengths and arrivals): 6 of
    its 120 requests were long (drawn one by one then; the share is now exact)."""
    kill_run: bool = True
    """Also run the disaggregated cluster with its prefill worker killed half-way."""
    dtype: str = "auto"
    num_blocks: int | None = None
    request_timeout_s: float = 900.0
    handoff_margin: float | None = None
    """The router's `disagg_handoff_margin` (None: its default)."""
    threshold_tokens: int | None = None
    """The router's `disagg_threshold_tokens` (None: the decode worker's step token budget)."""

    def router_args(self) -> dict:
        args = {"disagg_handoff_margin": self.handoff_margin, "disagg_threshold_tokens": self.threshold_tokens}
        return {k: v for k, v in args.items() if v is not None}

    def engine_args(self) -> dict:
        args = {"num_threads": self.threads_per_worker, "max_num_batched_tokens": self.max_num_batched_tokens,
                "enable_chunked_prefill": True, "dtype": self.dtype}
        if self.num_blocks is not None:
            args["num_blocks"] = self.num_blocks
        return args


def _metric_sum(url: str, name: str) -> float:
    """The sum of every sample of `name` in the Prometheus text at `url`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


async def _drive(cluster, config: DisaggBenchConfig, kill_prefill_at: float | None = None):
    """Send the workload to `cluster`; with `kill_prefill_at`, SIGKILL its prefill worker that many
    seconds into the run. Returns loadgen's RunResult."""
    from loadgen.backends import GrpcBackend, SendOptions
    from loadgen.runner import RunConfig, Runner

    await _warm_up(cluster)
    backend = GrpcBackend(cluster.grpc_target, options=SendOptions(request_timeout=config.request_timeout_s))
    await backend.connect()
    try:
        workload = mixed_workload(config)
        runner = Runner(workload, backend,
                        RunConfig(request_rate=config.rate, num_requests=config.requests, seed=config.seed,
                                  progress=False), log=lambda _: None)
        killer = None
        if kill_prefill_at is not None:
            async def kill() -> None:
                await asyncio.sleep(kill_prefill_at)
                proc = cluster.workers.procs[list(cluster.worker_ids).index("prefill-0")]
                os.killpg(proc.pid, signal.SIGKILL)
            killer = asyncio.create_task(kill())
        result = await runner.run()
        if killer is not None:
            killer.cancel()
        return result
    finally:
        await backend.close()


async def _warm_up(cluster) -> None:
    from kvweave import cluster_secret
    from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    import kvweave

    async with kvweave.AsyncClient(cluster.grpc_target) as client:
        max_len = min(m.max_model_len for m in await client.list_models())
    prompt = [7 + (i * 7919) % 400 for i in range(min(WARMUP_PROMPT_TOKENS, max_len // 2))]
    for address in cluster.worker_addresses.values():
        async with cluster_secret.insecure_channel(address, secret=cluster.secret) as channel:
            request = worker_pb2.WorkerGenerateRequest(
                prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
            async for _ in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=900):
                pass


def _run_cluster(config: DisaggBenchConfig, pools: dict, kill_prefill_at: float | None = None) -> tuple[dict, dict]:
    """Start a cluster with `pools` (LocalCluster's worker counts), drive it; returns (loadgen stats,
    the handoff and remote prefill time sums)."""
    from controlplane.cluster import LocalCluster
    from loadgen.stats import compute_stats, tpot

    slos = {"ttft": config.slo_ttft_ms, "tpot": config.slo_tpot_ms}
    with LocalCluster(model=config.model, engine_args=config.engine_args(), router_args=config.router_args(),
                      startup_timeout=600, **pools) as cluster:
        result = asyncio.run(_drive(cluster, config, kill_prefill_at))
        times = {}
        if pools.get("prefill_workers") and kill_prefill_at is None:
            urls = cluster.metrics_urls
            times = {"handoff_s": sum(_metric_sum(u, "kvweave_worker_handoff_seconds_sum")
                                      for w, u in urls.items() if w.startswith("decode")),
                     "remote_prefill_s": _metric_sum(urls["router"], "kvweave_router_remote_prefill_seconds_sum")}
    stats = compute_stats(result.records, start=result.start, duration=result.duration, goodput=slos)
    stats["short_records"] = [(r.tags.get("class"), r.disaggregation) for r in result.records if r.ok]
    stats["per_request"] = [{"class": r.tags.get("class"), "ok": r.ok, "ttft_ms": round(r.ttft * 1000, 1),
                             "tpot_ms": round((tpot(r) or 0.0) * 1000, 1), "decision": r.disaggregation,
                             "worker": r.worker_id} for r in result.records]
    return stats, times


def run_bench(config: DisaggBenchConfig, log=print) -> tuple[list[Result], dict]:
    log(f"colocated: 2 workers, {config.requests} requests at {config.rate}/s")
    colo, _ = _run_cluster(config, {"workers": 2})
    log(f"disaggregated: 1 prefill + 1 decode worker, the same workload")
    dis, times = _run_cluster(config, {"workers": 0, "prefill_workers": 1, "decode_workers": 1})
    results = [
        Result("itl_p99_disagg", dis["p99_itl_ms"], "ms", "itl_p99_colocated", colo["p99_itl_ms"],
               higher_is_better=False),
        Result("ttft_p50_disagg", dis["median_ttft_ms"], "ms", "ttft_p50_colocated", colo["median_ttft_ms"],
               higher_is_better=False),
        Result("goodput_disagg", dis["request_goodput"], "req/s", "goodput_colocated", colo["request_goodput"],
               extra={"slo": {"ttft_ms": config.slo_ttft_ms, "tpot_ms": config.slo_tpot_ms}}),
        Result("output_throughput_disagg", dis["output_throughput"], "tok/s", "output_throughput_colocated",
               colo["output_throughput"]),
    ]
    short = [d for cls, d in dis["short_records"] if cls == "short"]
    results.append(Result("short_no_handoff_share", sum(d != "remote" for d in short) / max(len(short), 1), "share",
                          "colocated (never hands off)", 1.0, extra={"short_requests": len(short)}))
    if times.get("remote_prefill_s"):
        results.append(Result("handoff_time_vs_prefill", times["handoff_s"], "s", "remote_prefill_time",
                              times["remote_prefill_s"], higher_is_better=False,
                              extra={"share": round(times["handoff_s"] / times["remote_prefill_s"], 4)}))
    details = {"colocated": _summary(colo), "disaggregated": _summary(dis)}
    if config.kill_run:
        kill_at = config.requests / config.rate / 2
        log(f"disaggregated with the prefill worker killed at {kill_at:.0f} s")
        killed, _ = _run_cluster(config, {"workers": 0, "prefill_workers": 1, "decode_workers": 1}, kill_at)
        sent = killed["completed"] + killed["failed"]
        results.append(Result("completed_with_prefill_killed", killed["completed"], "requests", "requests_sent", sent,
                              extra={"lost": killed["failed"], "errors": killed["errors_by_kind"]}))
        details["prefill_killed"] = _summary(killed)
    return results, details


def _summary(stats: dict) -> dict:
    keys = ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "errors_by_kind",
            "requests_by_disaggregation", "requests_by_worker", "latency_by_class", "latency_by_prefill",
            "per_request")
    return {k: stats[k] for k in keys if k in stats}


def add_parser(bsub: argparse._SubParsersAction) -> None:
    d = DisaggBenchConfig()
    p = bsub.add_parser("disagg", help="prefill/decode disaggregation (1 prefill + 1 decode worker) against 2 "
                                       "colocated workers, equal resources, a mixed long/short workload")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--model", default=d.model)
    p.add_argument("--requests", type=int, default=d.requests, help="requests per run")
    p.add_argument("--rate", type=float, default=d.rate, help="requests per second (Poisson)")
    p.add_argument("--long-fraction", type=float, default=d.long_fraction)
    p.add_argument("--long-input-len", type=length_range("--long-input-len"), default=d.long_input_len, metavar="LO:HI")
    p.add_argument("--long-output-len", type=int, default=d.long_output_len)
    p.add_argument("--short-input-len", type=length_range("--short-input-len"), default=d.short_input_len, metavar="LO:HI")
    p.add_argument("--short-output-len", type=int, default=d.short_output_len)
    p.add_argument("--threads-per-worker", type=int, default=d.threads_per_worker)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="every worker's step token budget (also the decision's default threshold)")
    p.add_argument("--handoff-margin", type=float, default=None,
                   help="the router's --disagg-handoff-margin (default: the router's)")
    p.add_argument("--threshold-tokens", type=int, default=None,
                   help="the router's --disagg-threshold-tokens (default: the decode worker's step budget)")
    p.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=d.slo_tpot_ms)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-kill-run", dest="kill_run", action="store_false",
                   help="skip the run in which the prefill worker is killed half-way")
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: from 1 GiB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or not args.rate > 0 or args.threads_per_worker < 1 or not 0 <= args.long_fraction <= 1:
        print("error: --requests and --threads-per-worker must be >= 1, --rate > 0, --long-fraction in [0, 1]",
              file=sys.stderr)
        return 2
    config = DisaggBenchConfig(**{k: getattr(args, k) for k in DisaggBenchConfig.__dataclass_fields__
                                  if hasattr(args, k)})
    results, details = run_bench(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    cfg = asdict(config)
    print(render("disagg", cfg, results))
    print(json.dumps(details, indent=1))
    if args.json:
        write_json(args.json, "disagg", {**cfg, "runs": details}, results)
    return 0
