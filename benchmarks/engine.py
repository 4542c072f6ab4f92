"""`kvweave bench engine`: the in-process engine against baselines measured in the same run.

Metrics (BENCHMARKS.md format, medians over repeats, ratios higher-is-better):
- throughput_vs_hf: output tok/s on requests of mixed lengths submitted at once, against Hugging
  Face `generate` on the same requests in left-padded batches (only each request's own requested
  tokens count as useful output).
- throughput_vs_hf_sequential: one request at a time on both sides (a subset of the requests).
  Both throughput metrics add where kvweave's steps spent their time (`step_phases`, per kind of
  step: worker/step_profile.py) and an op breakdown of decode steps at their batch size
  (`decode_op_profile`: benchmarks/op_profile.py).
- itl_p99_chunked_prefill: p99 inter-token latency of running decodes while long prompts keep
  arriving (a new one whenever none is prefilling), chunked prefill (Sarathi-Serve's stall-free
  batching) against the same engine prefilling whole prompts.
- ttft_prefix_hit: TTFT of a prompt whose head is in the prefix cache against the same prompt cold.
- prefill_under_eviction: a long prompt's prefill when every block it allocates evicts a cached one
  (the device cache full of another prompt's blocks, behind a small DRAM tier and an SSD tier),
  against the same prefill on an emptied device cache; KV jobs left in flight are drained between runs.
Times are taken in-process from `add_request` and `step()` return times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass

from benchmarks.op_profile import decode_op_profile, format_profile
from benchmarks.report import Result, median, metric_list_type, percentile, render, write_json

METRICS = ("throughput_vs_hf", "throughput_vs_hf_sequential", "itl_p99_chunked_prefill", "ttft_prefix_hit",
           "prefill_under_eviction")


@dataclass(frozen=True)
class BenchConfig:
    num_requests: int = 64
    prompt_len: tuple[int, int] = (64, 512)
    output_len: tuple[int, int] = (16, 128)
    hf_batch_size: int = 32
    num_sequential: int = 8
    """The sequential metric serves the first this many of the requests."""
    itl_num_decodes: int = 16
    itl_decode_prompt_len: int = 128
    itl_prompt_len: int = 2048
    itl_num_arrivals: int = 6
    ttft_prompt_len: int = 1024
    ttft_cached_len: int = 960
    eviction_prompt_len: int = 6144
    max_num_batched_tokens: int = 512
    repeats: int = 3
    seed: int = 0


QUICK = BenchConfig(num_requests=16, prompt_len=(32, 128), output_len=(8, 32), hf_batch_size=8, num_sequential=4,
                    itl_num_decodes=8, itl_decode_prompt_len=64, itl_prompt_len=1024, itl_num_arrivals=2,
                    ttft_prompt_len=512, ttft_cached_len=448, eviction_prompt_len=1024, repeats=1)


def fit_context(cfg: BenchConfig, max_len: int, block_size: int = 16) -> BenchConfig:
    """Scale every length down so the longest prompt takes at most half of a short context (tiny
    models); the eviction prompt only has to fit the context."""
    cfg = dataclasses.replace(cfg, eviction_prompt_len=min(cfg.eviction_prompt_len, max_len - block_size))
    longest = max(cfg.prompt_len[1] + cfg.output_len[1], cfg.itl_prompt_len, cfg.ttft_prompt_len)
    if 2 * longest <= max_len:
        return cfg
    f = (max_len // 2) / longest

    def s(n: int) -> int:
        return max(2, int(n * f))

    cached = max(block_size, s(cfg.ttft_cached_len) // block_size * block_size)
    return dataclasses.replace(
        cfg, prompt_len=(s(cfg.prompt_len[0]), s(cfg.prompt_len[1])),
        output_len=(s(cfg.output_len[0]), s(cfg.output_len[1])), itl_decode_prompt_len=s(cfg.itl_decode_prompt_len),
        itl_prompt_len=s(cfg.itl_prompt_len), ttft_prompt_len=s(cfg.ttft_prompt_len), ttft_cached_len=cached)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _paired(ours: list[float], theirs: list[float], higher_is_better: bool) -> float:
    """Median of the per-repeat ratios: steadier than the ratio of medians when the machine's load shifts."""
    return round(median([a / b if higher_is_better else b / a for a, b in zip(ours, theirs)]), 3)


def _params(n: int):
    from kvweave.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


class BenchContext:
    """Engines and the HF model, each loaded once and shared by the metrics; the workloads."""

    def __init__(self, model: str, dtype: str, cfg: BenchConfig, progress=_stderr) -> None:
        from worker.engine import resolve_dtype

        self.model, self.cfg, self.progress = model, cfg, progress
        self.dtype = resolve_dtype(dtype)
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        self.start = time.perf_counter()
        self._engines: dict[bool, object] = {}
        self._hf = None
        self.rng = random.Random(cfg.seed)

    def log(self, msg: str) -> None:
        self.progress(f"[{time.perf_counter() - self.start:7.1f}s] {msg}")

    def engine(self, chunked: bool = True):
        if chunked not in self._engines:
            from worker.engine import EngineConfig, LLMEngine

            self.log(f"loading kvweave engine (chunked prefill {'on' if chunked else 'off'}, {self.dtype_name})")
            ecfg = EngineConfig(model=self.model, dtype=self.dtype_name, enable_chunked_prefill=chunked,
                                max_num_batched_tokens=self.cfg.max_num_batched_tokens, enable_prefix_caching=True,
                                max_num_seqs=max(64, self.cfg.num_requests), kv_cache_gb=self.dtype.itemsize / 2)
            eng = LLMEngine(ecfg)
            eng.generate([self.random_prompt(eng, 32)], _params(4))  # warm-up: first forwards are slow
            self._engines[chunked] = eng
        return self._engines[chunked]

    def hf(self):
        if self._hf is None:
            from benchmarks.hf_baseline import load_hf_model

            self.log(f"loading Hugging Face transformers baseline ({self.dtype_name}, sdpa)")
            self._hf = load_hf_model(self.model, self.dtype)
        return self._hf

    def random_prompt(self, eng, n: int) -> list[int]:
        return [self.rng.randrange(eng.args.vocab_size) for _ in range(n)]

    def requests(self) -> tuple[list[list[int]], list[int]]:
        """The throughput workload, the same on every call (its own seeded generator)."""
        rng, c, vocab = random.Random(self.cfg.seed), self.cfg, self.engine().args.vocab_size
        lens = [rng.randint(*c.prompt_len) for _ in range(c.num_requests)]
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
        return prompts, [rng.randint(*c.output_len) for _ in range(c.num_requests)]


def kv_serve(eng, prompts: list[list[int]], max_tokens: list[int], one_at_a_time: bool = False) -> float:
    """Seconds for kvweave to serve the requests (all submitted at once, or one after another), cold cache."""
    eng.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    batches = [[i] for i in range(len(prompts))] if one_at_a_time else [list(range(len(prompts)))]
    outs = []
    for b in batches:
        outs += eng.generate([prompts[i] for i in b], [_params(max_tokens[i]) for i in b])
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == list(max_tokens), "lengths were not forced"
    return elapsed


def check_hf_agreement(ctx: BenchContext, prompt: list[int], n: int = 8) -> int:
    """Leading greedy tokens on which kvweave and HF agree (bf16 near-ties can flip later ones)."""
    from benchmarks.hf_baseline import generate_padded

    eng = ctx.engine()
    eng.block_manager.reset_prefix_cache()
    ours = eng.generate([prompt], _params(n))[0].token_ids
    theirs = generate_padded(ctx.hf(), [prompt], n)[0]
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
    ctx.log(f"sanity: kvweave and HF agree on {agree}/{n} first greedy tokens")
    if agree < min(n, 4):
        ctx.log(f"WARNING: kvweave {ours} vs HF {theirs}: outputs differ early; check the model code")
    return agree


def bench_throughput(ctx: BenchContext, sequential: bool) -> Result:
    from benchmarks.hf_baseline import run_batched

    c = ctx.cfg
    prompts, max_tokens = ctx.requests()
    if sequential:
        prompts, max_tokens = prompts[:c.num_sequential], max_tokens[:c.num_sequential]
    eng, hf = ctx.engine(), ctx.hf()
    agree = check_hf_agreement(ctx, prompts[0])
    useful, batch = sum(max_tokens), 1 if sequential else c.hf_batch_size
    ours, theirs, raw = [], [], []
    eng.profile.reset()
    for r in range(c.repeats):
        ours.append(useful / kv_serve(eng, prompts, max_tokens, one_at_a_time=sequential))
        secs, num_raw = run_batched(hf, prompts, max_tokens, batch)
        theirs.append(useful / secs)
        raw.append(num_raw / secs)
        ctx.log(f"{'sequential' if sequential else 'batched'} throughput {r + 1}/{c.repeats}: "
                f"kvweave {ours[-1]:.1f} tok/s, HF {theirs[-1]:.1f} useful ({raw[-1]:.1f} raw) tok/s")
    name = "throughput_vs_hf_sequential" if sequential else "throughput_vs_hf"
    baseline = "hf generate, one at a time" if sequential else f"hf generate, padded batches of {batch}"
    extra = {"num_requests": len(prompts), "output_tokens": useful, "hf_raw_tok_per_s": round(median(raw), 2),
             "runs": [round(x, 2) for x in ours], "baseline_runs": [round(x, 2) for x in theirs],
             "paired_ratio_median": _paired(ours, theirs, True), "hf_agreeing_first_tokens": agree,
             "step_phases": eng.profile.snapshot()}
    ctx.log("op profile of decode steps")
    extra["decode_op_profile"] = decode_op_profile(eng, batch, sum(map(len, prompts)) // len(prompts))
    return Result(name, median(ours), "tok/s", baseline, median(theirs), True, extra)


def itl_run(ctx: BenchContext, eng) -> list[float]:
    """Inter-token latencies (ms) of running decodes while long prompts arrive one after another."""
    c = ctx.cfg
    eng.block_manager.reset_prefix_cache()
    budget = eng.max_model_len - c.itl_decode_prompt_len - 1
    decode_ids = [eng.add_request(ctx.random_prompt(eng, c.itl_decode_prompt_len), _params(min(4096, budget)))
                  for _ in range(c.itl_num_decodes)]
    last: dict[str, float] = {}
    while len(last) < len(decode_ids):  # until every decode has its first token
        for o in eng.step():
            last[o.req_id] = time.perf_counter()
    samples: list[float] = []
    arrivals, prefilling = c.itl_num_arrivals, None
    while arrivals or prefilling:
        if prefilling is None:
            prefilling = eng.add_request(ctx.random_prompt(eng, c.itl_prompt_len), _params(1))
            arrivals -= 1
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.req_id == prefilling and o.finished:
                prefilling = None
            elif o.req_id in last and o.new_token_ids:
                samples.append((now - last[o.req_id]) * 1e3)
                last[o.req_id] = now
    for rid in decode_ids:
        eng.abort_request(rid)
    return samples


def bench_itl(ctx: BenchContext) -> Result:
    c = ctx.cfg
    chunked, whole = ctx.engine(chunked=True), ctx.engine(chunked=False)
    p99s, base_p99s, p50s, base_p50s, n = [], [], [], [], 0
    for r in range(c.repeats):
        ours, theirs = itl_run(ctx, chunked), itl_run(ctx, whole)
        p99s.append(percentile(ours, 99))
        base_p99s.append(percentile(theirs, 99))
        p50s.append(percentile(ours, 50))
        base_p50s.append(percentile(theirs, 50))
        n = len(ours)
        ctx.log(f"ITL {r + 1}/{c.repeats}: p99 chunked {p99s[-1]:.1f} ms vs whole-prompt {base_p99s[-1]:.1f} ms "
                f"(p50 {p50s[-1]:.1f} vs {base_p50s[-1]:.1f})")
    extra = {"p50_ms": round(median(p50s), 2), "baseline_p50_ms": round(median(base_p50s), 2),
             "num_samples": n, "runs": [round(x, 2) for x in p99s], "baseline_runs": [round(x, 2) for x in base_p99s],
             "paired_ratio_median": _paired(p99s, base_p99s, False)}
    return Result("itl_p99_chunked_prefill", median(p99s), "ms", "no chunked prefill", median(base_p99s), False, extra)


def ttft(eng, prompt: list[int]) -> tuple[float, int]:
    """Milliseconds from add_request to the prompt's first token, and its prompt tokens served from cache."""
    start = time.perf_counter()
    rid = eng.add_request(prompt, _params(1))
    while eng.has_unfinished():
        for o in eng.step():
            if o.req_id == rid and o.new_token_ids:
                return (time.perf_counter() - start) * 1e3, o.num_cached_tokens
    raise AssertionError(f"request {rid} ended without a token")


def bench_ttft(ctx: BenchContext) -> Result:
    c = ctx.cfg
    eng = ctx.engine()
    warm, cold, num_cached = [], [], 0
    for r in range(max(c.repeats, 5)):
        shared = ctx.random_prompt(eng, c.ttft_cached_len)
        tail = c.ttft_prompt_len - c.ttft_cached_len
        prompt = shared + ctx.random_prompt(eng, tail)
        eng.block_manager.reset_prefix_cache()
        cold.append(ttft(eng, prompt)[0])
        eng.block_manager.reset_prefix_cache()
        ttft(eng, shared + ctx.random_prompt(eng, tail))  # another request sharing the head fills the cache
        ms, num_cached = ttft(eng, prompt)
        warm.append(ms)
        ctx.log(f"TTFT {r + 1}: {warm[-1]:.1f} ms with {num_cached} cached tokens vs {cold[-1]:.1f} ms cold")
    extra = {"prompt_tokens": c.ttft_prompt_len, "cached_tokens": num_cached,
             "runs": [round(x, 2) for x in warm], "baseline_runs": [round(x, 2) for x in cold],
             "paired_ratio_median": _paired(warm, cold, False)}
    return Result("ttft_prefix_hit", median(warm), "ms", "same prompt, prefix cache reset", median(cold), False, extra)


def drain(eng) -> None:
    """Run the engine until nothing is left in flight (write-through KV saves included)."""
    while eng.has_unfinished():
        eng.step()


def bench_eviction(ctx: BenchContext) -> Result:
    import tempfile

    from worker.engine import EngineConfig, LLMEngine

    c = ctx.cfg
    n = c.eviction_prompt_len
    bs = 16
    num_blocks = -(-n // bs) + 8  # the prompt fills the device cache
    per_block = ctx.engine().connector.layout.nbytes
    with tempfile.TemporaryDirectory(prefix="kvweave-bench-evict-") as tmp:
        ctx.log(f"loading an engine with {num_blocks} device blocks, a small DRAM tier and an SSD tier")
        eng = LLMEngine(EngineConfig(model=ctx.model, dtype=ctx.dtype_name, num_blocks=num_blocks, block_size=bs,
                                     max_num_batched_tokens=c.max_num_batched_tokens,
                                     dram_cache_gb=num_blocks * per_block / 4 / 2**30,
                                     ssd_cache_gb=4 * num_blocks * per_block / 2**30, ssd_cache_dir=tmp))
        ttft(eng, ctx.random_prompt(eng, n))  # warm-up: the first long prefill allocates
        drain(eng)
        full, empty = [], []
        for r in range(c.repeats):
            eng.block_manager.reset_prefix_cache()
            empty.append(ttft(eng, ctx.random_prompt(eng, n))[0])
            drain(eng)  # the device cache now holds that prompt's blocks: each new block evicts one
            full.append(ttft(eng, ctx.random_prompt(eng, n))[0])
            drain(eng)
            ctx.log(f"prefill under eviction {r + 1}/{c.repeats}: {full[-1]:.0f} ms with a full device cache vs "
                    f"{empty[-1]:.0f} ms with an empty one")
        eng.close()
    extra = {"prompt_tokens": n, "device_blocks": num_blocks, "runs": [round(x, 1) for x in full],
             "baseline_runs": [round(x, 1) for x in empty], "paired_ratio_median": _paired(full, empty, False),
             "target": "ratio >= 0.91 (full cache <= 1.1x the empty one)"}
    return Result("prefill_under_eviction", median(full), "ms", "same prefill, device cache emptied first",
                  median(empty), False, extra)


def run_benchmark(model: str, dtype: str, cfg: BenchConfig, metrics: list[str], quick: bool = False,
                  progress=_stderr) -> tuple[dict, list[Result]]:
    """Run the chosen metrics; returns the report's config and results."""
    load_start = os.getloadavg()[0]
    ctx = BenchContext(model, dtype, cfg, progress)
    cfg = ctx.cfg = fit_context(cfg, ctx.engine().max_model_len)
    runners = {"throughput_vs_hf": lambda: bench_throughput(ctx, sequential=False),
               "throughput_vs_hf_sequential": lambda: bench_throughput(ctx, sequential=True),
               "itl_p99_chunked_prefill": lambda: bench_itl(ctx), "ttft_prefix_hit": lambda: bench_ttft(ctx),
               "prefill_under_eviction": lambda: bench_eviction(ctx)}
    results = []
    for m in metrics:
        ctx.log(f"metric {m}")
        results.append(runners[m]())
    config = {"model": model, "dtype": ctx.dtype_name, "quick": quick, "metrics": metrics,
              **dataclasses.asdict(cfg),
              "sequential_subset": f"first {cfg.num_sequential} of the {cfg.num_requests} requests",
              "elapsed_s": round(time.perf_counter() - ctx.start, 1),
              "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    return config, results


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("engine", help="engine throughput, ITL and TTFT against HF transformers and ablations")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run of ~2 minutes")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="model dtype of kvweave and the HF baseline alike (default: auto)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per metric (default: 3, quick: 1)")
    p.add_argument("--metrics", type=metric_list_type(METRICS), default=list(METRICS),
                   help=f"comma-separated subset of: {', '.join(METRICS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    p.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from worker.config import ConfigError
    from kvweave.model_files import CheckpointError, ModelNotFoundError

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    if args.repeats is not None:
        if args.repeats <= 0:
            _stderr("error: --repeats must be positive")
            return 2
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    try:
        config, results = run_benchmark(args.model, args.dtype, cfg, args.metrics, quick=args.quick)
    except (ConfigError, CheckpointError, ModelNotFoundError) as e:
        _stderr(f"error: {e}")
        return 2
    print(render("engine", config, results))
    for r in results:
        if "decode_op_profile" in r.extra:
            print(f"{r.metric}: {format_profile(r.extra['decode_op_profile'])}")
            print(f"{r.metric}: step phases (ms per step): {json.dumps(r.extra['step_phases'])}")
    if args.json:
        write_json(args.json, "engine", config, results)
    return 0
