"""`kvweave bench serve`: kvweave's serving path against vLLM's CPU build (and llama.cpp's server)
on the same model, workloads and cores, measured in the same run.

Every server is driven the same way, through its OpenAI HTTP API (loadgen's `OpenAIBackend`): an
embedded kvweave cluster (controlplane.cluster.LocalCluster: Redis, the router, `--workers`
workers sharing the cores) first, then each `--peer` (benchmarks/peers.py: its own environment,
made on first use, serving the same bf16 weights: a Hugging Face folder exported from kvweave's
checkpoint for vLLM, benchmarks/hf_export.py; the GGUF rewritten in bf16 for llama.cpp). Servers
run one after the other, never at once, on the same cores, with the same context length and KV
cache size (vLLM's; llama.cpp's server sizes its cache from the context).

Each server first serves `--warmup-requests` short requests (first-use kernel loads and
allocations), then every workload: loadgen's `random`, `prefix-repetition` and `rag` (passages as
plain text, loadgen's --no-chunks, so every server gets the same prompt text) by default,
`--num-requests` each, all sent at once, greedy, ignoring EOS, with loadgen's default lengths.
The same seed gives every server the same prompts (llama.cpp's server takes text only: token-id
prompts, random and prefix-repetition, reach it as their text, which it tokenizes about as long).

With `--repeats N` every workload runs N times on each server (run i with seed + i, the same
requests for every server): the figures are the medians (counts summed, each run in `per_run`) and
each ratio also has `paired_ratio_median`, the median over i of run i's ratio.

Reported per workload and server (the JSON's `config.runs`): output tok/s, mean and median TPOT,
mean TTFT, mean ITL, completed and failed; and per workload and peer, as results:
`throughput_vs_<peer>/<workload>` (kvweave's output tok/s / the peer's: above 1 kvweave is faster)
and `tpot_vs_<peer>/<workload>` (the peer's mean TPOT / kvweave's, BENCHMARKS.md's rule for
times: above 1 kvweave is faster), with <peer> vllm_cpu or llama_cpp.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.peers import (PEERS, PeerError, PeerSpec, ServeSettings, cache_dir, ensure_env, gguf_bf16,
                              parse_peers, peer_version, start_server)
from benchmarks.report import Result, render, write_json
from kvweave.defaults import DEFAULT_MODEL

DEFAULT_WORKLOADS = ("random", "prefix-repetition", "rag")
SUMMARY_KEYS = ("completed", "failed", "duration", "output_throughput", "mean_tpot_ms", "median_tpot_ms",
                "mean_ttft_ms", "median_ttft_ms", "mean_itl_ms", "total_input_tokens", "total_output_tokens",
                "errors_by_kind")
KVWEAVE = "kvweave"


@dataclass
class ServeBenchConfig:
    model: str = DEFAULT_MODEL
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    num_requests: int = 32
    """Requests per workload, all sent at once."""
    workers: int = 1
    """kvweave workers; they share the cores (threads per worker: cores // workers)."""
    peers: tuple[str, ...] = ()
    output_len: int | None = None
    """Output tokens per request (None: loadgen's default of each workload)."""
    seed: int = 0
    warmup_requests: int = 4
    kv_cache_gb: float = 1.0
    """KV cache of every server (kvweave's engine default; vLLM's VLLM_CPU_KVCACHE_SPACE in whole GiB)."""
    request_timeout_s: float = 1800.0
    stall_timeout_s: float | None = None
    """The kvweave router's `stall_timeout_s` (None: its default, 60 s). Requests queued for their
    first token are not stalled (their worker sends heartbeats)."""
    startup_timeout_s: float = 900.0
    peer_cache_dir: str | None = None
    """Where the peers' environments, the exported model and the server logs live (None:
    $KVWEAVE_PEER_CACHE or ~/.cache/kvweave/peers)."""
    repeats: int = 1
    """Times each workload is sent to each server, run i with seed `seed + i` (new prompts, so no
    run is served from the previous one's prefix cache; the same prompts for every server)."""


def build_workload(name: str, config: ServeBenchConfig, token_range: tuple[int, int], seed: int | None = None):
    """loadgen's workload `name` as `kvweave loadgen --workload NAME --no-chunks` builds it (with
    `seed`, default the config's)."""
    from loadgen.workloads import add_workload_arguments, build_workload as build

    parser = argparse.ArgumentParser(add_help=False)
    add_workload_arguments(parser)
    argv = ["--workload", name, "--no-chunks", "--token-range", f"{token_range[0]}:{token_range[1]}"]
    if config.output_len is not None:
        argv += ["--output-len", str(config.output_len)]
    args = parser.parse_args(argv)
    args.seed = config.seed if seed is None else seed
    return build(args)


class TextPrompts:
    """`workload` with its token-id prompts sent as their text, for a server that takes only text
    (llama.cpp's): the server's tokenizer then counts the prompt (about the same length)."""

    def __init__(self, workload, tokenizer) -> None:
        self.workload, self.tokenizer, self.name = workload, tokenizer, workload.name

    def sessions(self):
        for session in self.workload.sessions():
            session.turns = [self._as_text(turn) for turn in session.turns]
            yield session

    def _as_text(self, turn):
        if turn.token_ids is None:
            return turn
        return replace(turn, token_ids=None, prompt=self.tokenizer.decode(turn.token_ids, skip_special_tokens=False))


async def drive(url: str, workload, num_requests: int, config: ServeBenchConfig,
                extra_body: dict | None = None) -> dict:
    """Send `num_requests` of `workload` at once to the OpenAI server at `url` (with `extra_body` in
    every request); loadgen's figures."""
    from loadgen.backends import OpenAIBackend, SendOptions
    from loadgen.runner import RunConfig, Runner
    from loadgen.stats import compute_stats

    backend = OpenAIBackend(url, extra_body=extra_body, options=SendOptions(
        temperature=0.0, ignore_eos=True, request_timeout=config.request_timeout_s))
    await backend.connect()
    try:
        run_config = RunConfig(request_rate=math.inf, num_requests=num_requests, seed=config.seed, progress=False)
        result = await Runner(workload, backend, run_config, log=lambda _: None).run()
    finally:
        await backend.close()
    stats = compute_stats(result.records, start=result.start, duration=result.duration)
    return {k: stats[k] for k in SUMMARY_KEYS}


def measure(server: str, url: str, config: ServeBenchConfig, token_range: tuple[int, int], log=print,
            text_with=None, extra_body: dict | None = None) -> dict:
    """Warm `url` up, then run every workload on it; workload -> figures. `text_with`: a tokenizer
    to send token-id prompts as text with (TextPrompts); `extra_body`: fields every request gets."""
    from loadgen.workloads import RandomWorkload

    def sent(workload):
        return workload if text_with is None else TextPrompts(workload, text_with)

    if config.warmup_requests:
        warmup = RandomWorkload(input_len=64, output_len=8, token_range=token_range, seed=config.seed + 1)
        asyncio.run(drive(url, sent(warmup), config.warmup_requests, config, extra_body))
    runs = {}
    for name in config.workloads:
        per_run = []
        for i in range(config.repeats):
            workload = sent(build_workload(name, config, token_range, config.seed + i))
            per_run.append(asyncio.run(drive(url, workload, config.num_requests, config, extra_body)))
            log(f"{server} {name}{f' (run {i + 1})' if config.repeats > 1 else ''}: {_line(per_run[-1])}")
        runs[name] = combine(per_run)
    return runs


MEDIAN_KEYS = ("duration", "output_throughput", "mean_tpot_ms", "median_tpot_ms", "mean_ttft_ms", "median_ttft_ms",
               "mean_itl_ms")


def combine(per_run: list[dict]) -> dict:
    """One server's figures for a workload over its runs: the median of each time and rate, the sum
    of the counts, and (with more than one run) every run's figures in `per_run`."""
    if len(per_run) == 1:
        return per_run[0]
    out = {k: statistics.median(r[k] for r in per_run) for k in MEDIAN_KEYS}
    for k in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        out[k] = sum(r[k] for r in per_run)
    errors: dict[str, int] = {}
    for r in per_run:
        for kind, n in r["errors_by_kind"].items():
            errors[kind] = errors.get(kind, 0) + n
    out["errors_by_kind"] = errors
    out["per_run"] = per_run
    return out


def _line(s: dict) -> str:
    return (f"{s['output_throughput']:.1f} out tok/s, TPOT mean {s['mean_tpot_ms']:.1f} ms, TTFT mean "
            f"{s['mean_ttft_ms']:.0f} ms, {s['completed']} completed, {s['failed']} failed")


def run_kvweave(config: ServeBenchConfig, settings: ServeSettings, token_range, log_dir: Path, log=print) -> dict:
    from controlplane.cluster import LocalCluster

    threads = max(1, len(settings.cpus) // config.workers)
    log(f"kvweave: {config.workers} worker(s), {threads} thread(s) each")
    router_args = {} if config.stall_timeout_s is None else {"stall_timeout_s": config.stall_timeout_s}
    with LocalCluster(model=config.model, workers=config.workers, startup_timeout=config.startup_timeout_s,
                      engine_args={"num_threads": threads, "kv_cache_gb": config.kv_cache_gb},
                      router_args=router_args, log_dir=str(log_dir / KVWEAVE)) as cluster:
        return measure(KVWEAVE, cluster.http_url, config, token_range, log)


@dataclass
class PreparedPeer:
    spec: PeerSpec
    python: Path | None = None
    model_path: Path | None = None
    unavailable: str | None = None
    """Why the peer is not measured (a setup that failed, for a peer that may fail)."""


def prepare_peer(spec: PeerSpec, config: ServeBenchConfig, root: Path, log=print) -> PreparedPeer:
    """The peer's environment and model files; PeerError for a required peer that cannot be set up."""
    from kvweave.model_files import resolve_model

    try:
        python = ensure_env(spec, root, log)
        if spec.name == "vllm":
            from benchmarks.hf_export import export_hf_folder

            name = Path(config.model).stem if Path(config.model).exists() else config.model
            model_path = export_hf_folder(config.model, root / "models" / f"{name}-bf16")
        else:
            source = resolve_model(config.model)
            if not source.is_file():
                raise PeerError(f"{spec.name} serves GGUF files; {config.model} is a Hugging Face folder")
            model_path = gguf_bf16(python, source, root / "models" / f"{source.stem}-bf16.gguf")
        return PreparedPeer(spec, python, model_path)
    except PeerError as e:
        if spec.required:
            raise
        log(f"{spec.name} is unavailable: {e}")
        return PreparedPeer(spec, unavailable=str(e))


def run_peer(peer: PreparedPeer, config: ServeBenchConfig, settings: ServeSettings, token_range, log_dir: Path,
             log=print) -> tuple[dict, dict]:
    """(workload -> figures, what was run) for one prepared peer; a server that fails to start
    leaves the figures empty and says why."""
    from kvweave.model_files import load_tokenizer
    from loadgen.backends import BackendError

    server = start_server(peer.spec, peer.python, peer.model_path, settings, log_dir, config.startup_timeout_s)
    info = {"version": peer_version(peer.spec, peer.python), "command": server.command, "log": str(server.log_path),
            "env": {k: v for k, v in server.env.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}}
    log(f"{peer.spec.name}: starting ({' '.join(server.command[1:4])} ...; log: {server.log_path})")
    tokenizer = load_tokenizer(config.model).tokenizer
    text_with = None if peer.spec.token_prompts else tokenizer
    extra_body = None if peer.spec.ignore_eos else eos_bias(tokenizer.eos_token_ids)
    info["extra_body"] = extra_body
    try:
        with server:
            return measure(peer.spec.name, server.url, config, token_range, log, text_with, extra_body), info
    except (PeerError, BackendError) as e:  # it did not start, or stopped answering
        log(f"error: {e}")
        return {}, {**info, "unavailable": str(e)}


def eos_bias(eos_token_ids: list[int]) -> dict:
    """Request fields that keep a server without `ignore_eos` from ending at EOS: a -100 logit bias
    on every EOS id (greedy never picks them, so each request generates its max_tokens)."""
    return {"logit_bias": {str(i): -100.0 for i in eos_token_ids}}


def ratios(runs: dict[str, dict], peers: list[PeerSpec], workloads) -> list[Result]:
    """throughput_vs_<peer>/<workload> and tpot_vs_<peer>/<workload> for every measured peer."""
    results = []
    for name in workloads:
        ours = runs[KVWEAVE][name]
        for spec in peers:
            theirs = runs.get(spec.name, {}).get(name)
            if not theirs or not theirs["completed"] or not ours["completed"]:
                continue
            for metric, key, unit, what, higher in (("throughput", "output_throughput", "tok/s", "output tok/s", True),
                                                     ("tpot", "mean_tpot_ms", "ms", "mean TPOT", False)):
                extra = {"workload": name, "peer": spec.name}
                if "per_run" in ours and "per_run" in theirs:  # run i of each server had the same requests
                    a, b = [r[key] for r in ours["per_run"]], [r[key] for r in theirs["per_run"]]
                    paired = [x / y if higher else y / x for x, y in zip(a, b) if x > 0 and y > 0]
                    extra |= {"runs": a, "baseline_runs": b,
                              "paired_ratio_median": round(statistics.median(paired), 3) if paired else None}
                results.append(Result(f"{metric}_vs_{spec.label}/{name}", ours[key], unit, f"{spec.label} {what}",
                                      theirs[key], higher_is_better=higher, extra=extra))
    return results


def run_bench(config: ServeBenchConfig, log=print) -> tuple[list[Result], dict]:
    """Every server on every workload; PeerError when a required peer cannot be set up."""
    from benchmarks.mixed_load import vocab_token_range
    from kvweave.model_files import load_tokenizer

    loadavg_start = round(os.getloadavg()[0], 2)
    root = cache_dir(config.peer_cache_dir)
    peers = parse_peers(list(config.peers))
    prepared = [prepare_peer(spec, config, root, log) for spec in peers]  # before any server: fail early
    loaded = load_tokenizer(config.model)
    settings = ServeSettings(served_name=loaded.name, max_model_len=loaded.max_seq_len,
                             cpus=tuple(sorted(os.sched_getaffinity(0))), kv_cache_gb=config.kv_cache_gb)
    token_range = vocab_token_range(config.model)
    log_dir = root / "logs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = {KVWEAVE: run_kvweave(config, settings, token_range, log_dir, log)}
    servers: dict[str, dict] = {KVWEAVE: {"workers": config.workers, "log_dir": str(log_dir / KVWEAVE)}}
    for peer in prepared:
        if peer.unavailable:
            servers[peer.spec.name] = {"unavailable": peer.unavailable}
            continue
        runs[peer.spec.name], servers[peer.spec.name] = run_peer(peer, config, settings, token_range, log_dir, log)
    by_workload = {name: {server: figures[name] for server, figures in runs.items() if name in figures}
                   for name in config.workloads}
    details = {"runs": by_workload, "servers": servers, "cpus": list(settings.cpus),
               "max_model_len": settings.max_model_len, "token_range": list(token_range),
               "loadavg_1min_at_start": loadavg_start}
    return ratios(runs, peers, config.workloads), details


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(bsub: argparse._SubParsersAction) -> None:
    d = ServeBenchConfig()
    p = bsub.add_parser("serve", help="kvweave's OpenAI serving path against vLLM's CPU build (--peer vllm) and "
                                      "llama.cpp's server on the same model, workloads and cores")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--model", default=d.model)
    p.add_argument("--workloads", type=_csv, default=list(d.workloads), metavar="A,B",
                   help=f"loadgen workloads (default {','.join(d.workloads)})")
    p.add_argument("--num-requests", type=int, default=d.num_requests, help="requests per workload, sent at once")
    p.add_argument("--workers", type=int, default=d.workers, help="kvweave workers (they share the cores)")
    p.add_argument("--peer", dest="peers", action="append", default=[], metavar="NAME",
                   help=f"measure a peer too: {', '.join(PEERS)} (repeatable or a comma list; its environment is "
                        "made on first use)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens per request (default: loadgen's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="runs of each workload per server, run i with seed + i (the figures: medians; the "
                        "ratios' paired_ratio_median: the median of run i's ratios)")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests,
                   help="short requests each server serves before it is measured")
    p.add_argument("--kv-cache-gb", type=float, default=d.kv_cache_gb, help="KV cache of every server")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--stall-timeout-s", type=float, default=None,
                   help="the kvweave router's --stall-timeout-s (default: the router's, 60 s)")
    p.add_argument("--startup-timeout-s", type=float, default=d.startup_timeout_s)
    p.add_argument("--peer-cache-dir", default=None, metavar="DIR",
                   help="the peers' environments, exported model and logs (default: $KVWEAVE_PEER_CACHE or "
                        "~/.cache/kvweave/peers)")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or None."""
    from loadgen.workloads import WORKLOADS

    try:
        parse_peers(args.peers)
    except ValueError as e:
        return str(e)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        return f"unknown --workloads {unknown[0][:40]!r}; valid: {', '.join(WORKLOADS)}" if unknown else \
            "--workloads names no workload"
    if args.num_requests < 1 or args.workers < 1 or args.repeats < 1 or args.warmup_requests < 0:
        return "--num-requests, --workers and --repeats must be >= 1, --warmup-requests >= 0"
    if args.output_len is not None and args.output_len < 1:
        return "--output-len must be >= 1"
    if not (args.kv_cache_gb > 0 and args.request_timeout_s > 0 and args.startup_timeout_s > 0
            and (args.stall_timeout_s is None or args.stall_timeout_s > 0)):
        return "--kv-cache-gb, --request-timeout-s, --stall-timeout-s and --startup-timeout-s must be > 0"
    return None


def run(args: argparse.Namespace) -> int:
    from controlplane.cluster_config import ClusterError
    from loadgen.backends import BackendError

    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    fields = ServeBenchConfig.__dataclass_fields__
    config = ServeBenchConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    config.workloads, config.peers = tuple(config.workloads), tuple(p.name for p in parse_peers(args.peers))
    try:
        results, details = run_bench(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (PeerError, ClusterError, BackendError, ValueError) as e:  # ValueError: a model that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = asdict(config)
    print(render("serve", cfg, results))
    print(json.dumps(details["runs"], indent=1))
    if args.json:
        write_json(args.json, "serve", {**cfg, **details}, results)
    failed = [name for name, info in details["servers"].items() if "unavailable" in info and PEERS[name].required]
    return 1 if failed else 0
