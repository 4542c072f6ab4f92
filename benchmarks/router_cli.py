"""`kvweave bench router`'s command line and its run: the cluster metrics (benchmarks/router.py),
prefix_aware's replay of a trace (benchmarks/mooncake_sim.py) and its comparison with sglang-router
(benchmarks/vs_sglang.py). The metrics and their setup are described in benchmarks/router.py."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

from benchmarks.report import Result, metric_list_type, render, write_json
from benchmarks.router import DEFAULT_TRACE, METRICS, QUICK, BenchConfig, run_cluster_metrics


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmark(cfg: BenchConfig, metrics: list[str], model: str | None, trace: Path | list, quick: bool = False,
                  progress=_stderr) -> tuple[dict, list[Result]]:
    """`trace`: one trace, or a list (prefix_hit_rate_mooncake replays the first, hit_rate_vs_sglang all)."""
    traces = list(trace) if isinstance(trace, (list, tuple)) else [trace]
    trace = traces[0]
    start, load_start = time.perf_counter(), os.getloadavg()[0]

    def log(msg: str) -> None:
        progress(f"[{time.perf_counter() - start:7.1f}s] {msg}")

    config, results = {}, []
    if {"router_overhead_p99", "routing_decisions_per_s"} & set(metrics):
        config, results = asyncio.run(run_cluster_metrics(cfg, model, metrics, log))
    if "prefix_hit_rate_mooncake" in metrics:
        log("metric prefix_hit_rate_mooncake")
        from benchmarks.mooncake_sim import SimConfig, bench_mooncake

        sim_cfg = _sim_config(cfg, cfg.sim_capacity_blocks)
        weights = {k: v for k, v in (("prefill_weight", cfg.prefill_weight), ("decode_weight", cfg.decode_weight))
                   if v is not None}
        results += bench_mooncake(trace, cfg.trace_requests, sim_cfg, cfg.trace_offset, weights, cfg.weight_grid, log)
    if "hit_rate_vs_sglang" in metrics:
        log("metric hit_rate_vs_sglang")
        results += _vs_sglang(cfg, traces, config, log)
    if "hit_rate_replicas" in metrics:
        log("metric hit_rate_replicas")
        results += _replicas(cfg, trace, log)
    if "chunk_reuse_vs_sglang" in metrics:
        log("metric chunk_reuse_vs_sglang")
        results += _rag_vs_sglang(cfg, config, log)
    config = {"quick": quick, "metrics": metrics, **dataclasses.asdict(cfg), **config, "trace": str(trace),
              "traces": [str(t) for t in traces],
              "elapsed_s": round(time.perf_counter() - start, 1),
              "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    return config, results


def _sim_config(cfg: BenchConfig, capacity: int):
    from benchmarks.cluster_sim import SimConfig

    return SimConfig(cfg.sim_workers, capacity, cfg.sim_ms_per_token, dram_x=cfg.sim_tiers[0], ssd_x=cfg.sim_tiers[1])


def _rag_vs_sglang(cfg: BenchConfig, config: dict, log) -> list[Result]:
    from benchmarks.rag_replay import RagReplayConfig, bench_rag_vs_sglang
    from benchmarks.sglang_peer import PeerConfig
    from kvweave.model_files import CheckpointError, ModelNotFoundError

    try:
        rows, why = bench_rag_vs_sglang(RagReplayConfig(), cfg.rag_requests, cfg.rag_offsets, cfg.rag_capacities,
                                        _sim_config(cfg, cfg.rag_capacities[0]), PeerConfig(speedup=cfg.peer_speedup),
                                        log)
    except (CheckpointError, ModelNotFoundError) as exc:  # the requests are tokenized by the default model's tokenizer
        rows, why = [], f"the default model's tokenizer is not available: {exc}"
        log(f"rag vs sglang: not measured: {why}")
    if why:
        config["chunk_reuse_vs_sglang_unavailable"] = why
    return rows


def _replicas(cfg: BenchConfig, trace, log) -> list[Result]:
    """hit_rate_replicas: 2 and 4 replicas against one router, per window and capacity."""
    from benchmarks.agent_trace import is_synthetic, synthetic_trace
    from benchmarks.mooncake_sim import SimConfig, chain_hashes, load_trace
    from benchmarks.replica_sim import REPLICA_SYNC_MS, simulate_replicas
    from controlplane.policies import make_policy

    results = []
    for offset in cfg.trace_offsets or (cfg.trace_offset,):
        requests = (synthetic_trace(str(trace), offset + cfg.trace_requests)[offset:] if is_synthetic(trace)
                    else load_trace(trace, cfg.trace_requests, offset))
        hashes = [chain_hashes(r.hash_ids) for r in requests]
        for capacity in cfg.sim_capacities or (cfg.sim_capacity_blocks,):
            sim = _sim_config(cfg, capacity)
            one = simulate_replicas(requests, lambda: make_policy("prefix_aware"), 1, sim, hashes)
            for n in (2, 4):
                r = simulate_replicas(requests, lambda: make_policy("prefix_aware"), n, sim, hashes)
                log(f"replicas x{n}, requests {offset}+, {capacity} blocks: hit rate {r.hit_rate:.4f} against one "
                    f"router's {one.hit_rate:.4f}, imbalance {r.imbalance:.3f}")
                results.append(Result(f"hit_rate_replicas/{n}/{offset}/{capacity}", r.hit_rate, "ratio",
                                      "one router (prefix_aware)", one.hit_rate, True,
                                      {"replicas": n, "first_request": offset, "num_requests": len(requests),
                                       "capacity_blocks": capacity, "imbalance": round(r.imbalance, 3),
                                       "one_router_imbalance": round(one.imbalance, 3), "target_ratio": 0.97,
                                       "load_view_stale_ms": REPLICA_SYNC_MS, "trace": str(trace)}))
    return results


def _vs_sglang(cfg: BenchConfig, traces: list, config: dict, log) -> list[Result]:
    from benchmarks.mooncake_sim import SimConfig
    from benchmarks.sglang_peer import PeerConfig
    from benchmarks.vs_sglang import bench_vs_sglang

    weights = {k: v for k, v in (("prefill_weight", cfg.prefill_weight), ("decode_weight", cfg.decode_weight))
               if v is not None}
    rows, why = bench_vs_sglang(traces, cfg.trace_requests, cfg.trace_offsets or (cfg.trace_offset,),
                                cfg.sim_capacities or (cfg.sim_capacity_blocks,),
                                _sim_config(cfg, cfg.sim_capacity_blocks),
                                PeerConfig(speedup=cfg.peer_speedup, replays=cfg.peer_replays), weights, log)
    if why:
        config["hit_rate_vs_sglang_unavailable"] = why
    return rows


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("router", help="router overhead and decision rate; hit rates on a trace and chunk reuse on "
                                       "RAG, against sglang-router")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smaller index, fewer requests: under a minute")
    p.add_argument("--metrics", type=metric_list_type(METRICS), default=list(METRICS),
                   help=f"comma-separated subset of: {', '.join(METRICS)}")
    p.add_argument("--model", default=None,
                   help="worker model (default: a tiny random-weight Llama written to a temp dir)")
    p.add_argument("--trace", type=Path, action="append", default=None,
                   help="Mooncake JSONL trace, or synthetic:agent[:SEED] (a generated agent/RAG trace, "
                        "benchmarks/agent_trace.py); repeatable: hit_rate_vs_sglang replays each, "
                        f"prefix_hit_rate_mooncake the first (default: {DEFAULT_TRACE})")
    p.add_argument("--trace-requests", type=int, default=None, help="replay N requests (default: 2000)")
    p.add_argument("--trace-offset", type=_int_list, default=None, metavar="N[,N...]",
                   help="replay from request number N on (default: 2000, after the window prefix_aware's "
                        "defaults were tuned on; 0 replays that window); a list gives hit_rate_vs_sglang "
                        "one window per offset (prefix_hit_rate_mooncake replays the first)")
    p.add_argument("--prefill-weight", type=float, default=None, help="prefix_aware's prefill_weight in the replay")
    p.add_argument("--decode-weight", type=float, default=None, help="prefix_aware's decode_weight in the replay")
    p.add_argument("--weight-grid", type=_weight_grid, default=None, metavar="PW,PW,...:DW,DW,...",
                   help="also replay prefix_aware at every (prefill_weight, decode_weight) pair, e.g. 1,4,8,16:64,512")
    p.add_argument("--sim-capacity", type=_int_list, default=None, metavar="N[,N...]",
                   help="blocks per simulated worker cache (default: 1000); a list gives hit_rate_vs_sglang one "
                        "row per capacity (prefix_hit_rate_mooncake uses the first)")
    p.add_argument("--peer-speedup", type=float, default=None,
                   help="sglang-router's replay runs the trace this many times faster than recorded; its fake "
                        "workers hold each answer (uncached prompt + output tokens) x 1 ms / speedup (default: 20)")
    p.add_argument("--peer-replays", type=int, default=None,
                   help="hit_rate_vs_sglang: replay sglang-router this many times per row (its choices depend on "
                        "the replay's timing) and compare with the mean of its hit rates (default: 1)")
    p.add_argument("--sim-tiers", type=_tiers, default=None, metavar="DRAM,SSD",
                   help="give every replay's simulated workers a DRAM and an SSD tier of DRAM and SSD times the "
                        "device capacity (e.g. 2,4); hits from them count at their load cost (default: 0,0, none)")
    p.add_argument("--rag-requests", type=int, default=None,
                   help="chunk_reuse_vs_sglang: requests per window of the shuffled-passage RAG replay (default: 2000)")
    p.add_argument("--rag-offset", type=_int_list, default=None, metavar="N[,N...]",
                   help="chunk_reuse_vs_sglang: first request of each window (default: 0,2000; 0-1999 is its "
                        "tuning window)")
    p.add_argument("--rag-capacity", type=_int_list, default=None, metavar="N[,N...]",
                   help="chunk_reuse_vs_sglang: device blocks (16 tokens) per simulated worker (default: 1000,2000)")
    p.add_argument("--index-blocks", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... (integers), got {text!r}") from None
    return values


def _tiers(text: str) -> tuple[float, float]:
    try:
        dram, ssd = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DRAM,SSD (two numbers), got {text!r}") from None
    if dram < 0 or ssd < 0 or (ssd and not dram):
        raise argparse.ArgumentTypeError(f"tiers must be >= 0, and an SSD tier needs a DRAM tier, got {text!r}")
    return dram, ssd


def _weight_grid(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        prefill, decode = text.split(":")
        grid = tuple(float(x) for x in prefill.split(",")), tuple(float(x) for x in decode.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PW,PW,...:DW,DW,... (numbers), got {text!r}") from None
    if any(x < 0 for xs in grid for x in xs):
        raise argparse.ArgumentTypeError(f"weights must be >= 0, got {text!r}")
    return grid


def _check_traces(traces: list, metrics: list[str], cfg: BenchConfig) -> str | None:
    """An error message when a trace or a window cannot be replayed."""
    from benchmarks.agent_trace import is_synthetic, parse_name
    from benchmarks.mooncake_sim import load_trace
    from loadgen.types import WorkloadError

    if "prefix_hit_rate_mooncake" in metrics and is_synthetic(traces[0]):
        return "error: prefix_hit_rate_mooncake replays a Mooncake file: give it as the first --trace"
    offsets = cfg.trace_offsets or (cfg.trace_offset,)
    for trace in traces:
        try:
            if is_synthetic(trace):
                parse_name(str(trace))
                continue
            if not Path(trace).exists():
                return f"error: trace {trace} not found (pass --trace)"
            for offset in offsets if "hit_rate_vs_sglang" in metrics else offsets[:1]:
                load_trace(trace, 1, offset)
        except (WorkloadError, ValueError) as exc:
            return f"error: --trace-offset: {exc}" if isinstance(exc, WorkloadError) else f"error: --trace: {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    cfg = QUICK if args.quick else BenchConfig()
    capacities, offsets = args.sim_capacity or (), args.trace_offset or ()
    overrides = {"trace_requests": args.trace_requests, "sim_capacity_blocks": capacities[0] if capacities else None,
                 "index_blocks_per_worker": args.index_blocks, "repeats": args.repeats,
                 "peer_speedup": args.peer_speedup, "peer_replays": args.peer_replays,
                 "rag_requests": args.rag_requests}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if any(v <= 0 for v in (*overrides.values(), *capacities, *(args.rag_capacity or ()))):
        _stderr("error: counts, capacities, --peer-speedup and --peer-replays must be positive")
        return 2
    if any(x < 0 for x in (*offsets, *(args.rag_offset or ()))):
        _stderr("error: --trace-offset and --rag-offset must be >= 0")
        return 2
    overrides.update(sim_capacities=tuple(capacities), trace_offsets=tuple(offsets))
    rag = {"rag_offsets": args.rag_offset, "rag_capacities": args.rag_capacity, "sim_tiers": args.sim_tiers}
    overrides.update({k: tuple(v) for k, v in rag.items() if v})
    traces = args.trace or [DEFAULT_TRACE]
    if any(w is not None and w < 0 for w in (args.prefill_weight, args.decode_weight)):
        _stderr("error: weights must be >= 0")
        return 2
    policy = {"trace_offset": offsets[0] if offsets else None, "prefill_weight": args.prefill_weight,
              "decode_weight": args.decode_weight, "weight_grid": args.weight_grid}
    cfg = dataclasses.replace(cfg, **overrides, **{k: v for k, v in policy.items() if v is not None})
    if {"prefix_hit_rate_mooncake", "hit_rate_vs_sglang", "hit_rate_replicas"} & set(args.metrics):
        error = _check_traces(traces, args.metrics, cfg)  # before the cluster metrics, which take minutes
        if error:
            _stderr(error)
            return 2
    if "chunk_reuse_vs_sglang" in args.metrics:
        from benchmarks.rag_replay import RagReplayConfig

        if not Path(RagReplayConfig().dataset).exists():
            _stderr(f"error: chunk_reuse_vs_sglang replays {RagReplayConfig().dataset}, which is not present")
            return 2
    config, results = run_benchmark(cfg, args.metrics, args.model, traces, quick=args.quick)
    print(render("router", config, results))
    if args.json:
        write_json(args.json, "router", config, results)
    return 0
