"""`kvweave bench router`: the router's overhead and decision rate, and prefix_aware on a real trace.

Setup (the first two metrics): a private redis-server; a real worker (by default a tiny
random-weight Llama written by the test suite's builder, context raised to 2048) served over gRPC
in this process; 4 registry entries w0..w3 that all point at that worker; a KV index of
4 x `index_blocks_per_worker` random 16-byte hashes (`KVIndex.replace`), plus the prompt's own
blocks on w0 so lookups find hits; the router (RouterServer: gRPC + OpenAI HTTP) in this process.

Metrics (BENCHMARKS.md format; percentiles pool every sample of the run, `runs` lists per-repeat
figures):
- router_overhead_p99: p99 of the router's decision path (the code of `Router._dispatch` before it
  forwards: eligible workers -> `_lookup` (hash chain + ONE Redis round trip) -> `_pick`) on a
  ~1k-token prompt, against a direct gRPC request to the worker (max_tokens=1). Stages come from
  the router's own stage timers. `_p99_grpc` / `_p99_http`: the whole request through the router
  (text prompt, so tokenizing counts) against the same request sent directly (token ids),
  interleaved; added = through-router percentile minus direct percentile.
- routing_decisions_per_s: the decision path with 16 decisions in flight on the event loop (as a
  router serving concurrent requests runs it; the one-at-a-time rate is in `extra`), the
  event-loop thread pinned to one core, against the same with the Redis round trip replaced by
  its answer.
- prefix_hit_rate_mooncake: benchmarks/mooncake_sim.py replays a window of the trace through the
  real policy objects; hit rate against one shared LRU cache of the combined capacity. The window
  starts after the one prefix_aware's default weights were tuned on (requests 0-1999), so the
  figure is out-of-sample; `--prefill-weight`/`--decode-weight` replay other weights and
  `--weight-grid` reports every setting of a grid on the window (how the defaults were chosen).
- hit_rate_vs_sglang: the same replay against sglang-router's cache_aware, run for real in front of
  fake workers, on every window of `--trace-offset` (a list) of every `--trace` (repeatable;
  `synthetic:agent` is a generated agent trace) at every `--sim-capacity` (a list), both scored
  by one cache model (benchmarks/vs_sglang.py, benchmarks/sglang_peer.py).
- chunk_reuse_vs_sglang: RAG requests whose passages recur in other orders (loadgen's rag workload
  with shuffled passages), replayed through chunk_aware and through sglang-router, scored by one
  cache model that credits chunk reuse: chunk-reused tokens per request, kvweave / sglang, on every
  window of `--rag-offset` at every `--rag-capacity` (benchmarks/rag_replay.py).
- `--sim-tiers DRAM,SSD` gives every replay's simulated workers DRAM and SSD tiers (multiples of
  the device capacity); hits from them count at their load cost (benchmarks/cluster_sim.py).
- hit_rate_replicas: prefix_aware's replay with 2 and 4 router replicas over one index, each with
  its own policy state and a load view up to 0.1 s stale (benchmarks/replica_sim.py), against one
  router, on every window of `--trace-offset` at every `--sim-capacity` (target: within 3%).
The command line and the run of these metrics are in benchmarks/router_cli.py.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import Result, median, percentile

DECISION_CONCURRENCY = 16
"""Decisions in flight for routing_decisions_per_s: a router interleaves the requests it serves,
so one decision's Redis round trip overlaps the others' hashing and scoring."""
METRICS = ("router_overhead_p99", "routing_decisions_per_s", "prefix_hit_rate_mooncake", "hit_rate_vs_sglang",
           "hit_rate_replicas", "chunk_reuse_vs_sglang")
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "mooncake_conversation.jsonl"
DECISION_TARGET_MS = 1.0
DECISIONS_TARGET_PER_S = 5000.0


@dataclass(frozen=True)
class BenchConfig:
    num_workers: int = 4
    index_blocks_per_worker: int = 250_000
    prompt_tokens: int = 1024
    num_decisions: int = 1000
    """Decision-path samples per repeat."""
    num_requests: int = 100
    """Requests per path (direct, router gRPC, router HTTP) per repeat."""
    rate_seconds: float = 3.0
    """Length of one decisions-per-second loop."""
    repeats: int = 3
    trace_requests: int = 2000
    trace_offset: int = 2000
    """First replayed request: the default window follows the one prefix_aware's defaults were tuned on."""
    prefill_weight: float | None = None
    """prefix_aware's prefill_weight in the replay (None: the policy's default)."""
    decode_weight: float | None = None
    weight_grid: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(prefill weights, decode weights): replay prefix_aware at every pair too."""
    sim_workers: int = 8
    sim_capacity_blocks: int = 1000
    sim_ms_per_token: float = 1.0
    seed: int = 0
    trace_offsets: tuple[int, ...] = ()
    """hit_rate_vs_sglang's windows (empty: `trace_offset`'s alone)."""
    sim_capacities: tuple[int, ...] = ()
    """hit_rate_vs_sglang's per-worker capacities (empty: `sim_capacity_blocks` alone)."""
    peer_speedup: float = 20.0
    """Trace time / wall time of sglang-router's replay."""
    peer_replays: int = 1
    """sglang-router replays per hit_rate_vs_sglang row (`PeerConfig.replays`)."""
    sim_tiers: tuple[float, float] = (0.0, 0.0)
    """Each simulated worker's DRAM and SSD tiers, in multiples of its device capacity (0: none)."""
    rag_requests: int = 2000
    """chunk_reuse_vs_sglang's window length."""
    rag_offsets: tuple[int, ...] = (0, 2000)
    """chunk_reuse_vs_sglang's windows (the first is its tuning window, benchmarks/rag_replay.py)."""
    rag_capacities: tuple[int, ...] = (1000, 2000)
    """chunk_reuse_vs_sglang's per-worker device capacities, in 16-token blocks."""


QUICK = BenchConfig(index_blocks_per_worker=25_000, num_decisions=300, num_requests=30, rate_seconds=1.0, repeats=2,
                    trace_requests=500, rag_requests=300, rag_offsets=(0, 2000), rag_capacities=(1000,))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _StageTee:
    """Stands in for one of the router's stage histograms: keeps each observation, then forwards it."""

    __slots__ = ("inner", "samples")

    def __init__(self, inner) -> None:
        self.inner, self.samples = inner, []

    def observe(self, value: float) -> None:
        self.samples.append(value)
        self.inner.observe(value)


class _AnsweredIndex:
    """A KV index whose lookups return a recorded answer without I/O (the no-Redis baseline)."""

    def __init__(self, hits: dict[str, bytes]) -> None:
        self.hits = hits

    async def leading_tiers(self, hashes, worker_ids, mediums=()) -> dict[str, bytes]:
        return self.hits


def tiny_checkpoint(folder: Path, max_len: int = 2048) -> Path:
    """The test suite's tiny random-weight Llama (tests/conftest.py's builder), context `max_len`."""
    builders = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    if not builders.exists():
        raise FileNotFoundError(f"{builders} not found (not a source checkout): pass --model")
    spec = importlib.util.spec_from_file_location("_kvweave_test_builders", builders)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_hf_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = max_len
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


_WORDS = ("the quick brown fox jumps over lazy dog a serving engine should never compute same key value cache "
          "twice retrieved documents system prompts and tool outputs recur across requests prefill decode can "
          "run on separate workers tokens stream back to client hello world").split()


def prompt_text(tokenizer, num_tokens: int, seed: int) -> str:
    """Random words until the prompt has at least `num_tokens` tokens."""
    rng, words = random.Random(seed), []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=True)) < num_tokens:
        words += [rng.choice(_WORDS) for _ in range(8)]
    return " ".join(words)


def _pct_ms(xs: list[float], q: float) -> float:
    return round(percentile(xs, q) * 1e3, 4)


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": _pct_ms(xs, 50), "p99_ms": _pct_ms(xs, 99)}


class RouterBench:
    """Redis, the worker, the registry entries, the index and the router; started once, shared by metrics."""

    def __init__(self, cfg: BenchConfig, model: str | None, log=_stderr) -> None:
        self.cfg, self.model_arg, self.log = cfg, model, log
        self._tmp = tempfile.TemporaryDirectory(prefix="kvweave-bench-router-")
        self.redis_server = self.worker = self.server = self.redis = None
        self.info: dict = {}

    @property
    def router(self):
        return self.server.router

    async def start(self) -> None:
        import redis.asyncio

        from controlplane.procs import RedisServer

        self.redis_server = RedisServer(workdir=self._tmp.name).start()
        self.redis = redis.asyncio.Redis.from_url(self.redis_server.url)
        model = self.model_arg or str(tiny_checkpoint(Path(self._tmp.name) / "tiny-model"))
        self.log(f"redis-server on {self.redis_server.url}; starting a worker on {model}")
        await self._start_worker(model)
        await self._build_router(model)
        await self._register()
        await self.server.start()
        assert len(self.router.pool.eligible()) == self.cfg.num_workers, "the router does not see the workers"
        await self._populate_index()

    async def _start_worker(self, model: str) -> None:
        from worker.engine import EngineConfig
        from worker.server import WorkerOptions, WorkerServer

        ecfg = EngineConfig(model=model, dtype="float32" if self.model_arg is None else "auto", num_blocks=1024,
                            num_threads=1)
        self.worker = WorkerServer(ecfg, WorkerOptions())  # no Redis: its registry entries are ours
        await self.worker.start()

    async def _build_router(self, model: str) -> None:
        from controlplane.router import Router, RouterConfig
        from controlplane.router_main import RouterServer, ServeOptions

        config = RouterConfig(redis_url=self.redis_server.url, model=model)
        router = await asyncio.to_thread(Router, config)
        router.metrics.stages = {k: _StageTee(v) for k, v in router.metrics.stages.items()}
        max_len = self.worker.engine.engine.max_model_len
        self.text = prompt_text(router.tokenizer, min(self.cfg.prompt_tokens, max_len - 64), self.cfg.seed)
        self.text_input, self.token_input = _input(self.text), None
        self.token_ids = router.encode(self.text_input)
        self.token_input = _input(self.token_ids)
        self.server = RouterServer(config, ServeOptions(), router)

    async def _register(self) -> None:
        from kvweave.registry import Registry, WorkerInfo

        engine = self.worker.engine.engine
        registry = Registry(self.redis, lease_s=3600)
        for i in range(self.cfg.num_workers):
            await registry.heartbeat(WorkerInfo(f"w{i}", self.worker.address, self.router.model.name,
                                                max_model_len=engine.max_model_len,
                                                block_size=engine.config.block_size))

    async def _populate_index(self) -> None:
        from kvstore.index import KVIndex
        from kvstore.keys import encode_extra_keys, hash_blocks

        c, index = self.cfg, KVIndex(self.redis, lease_s=3600)
        block_size = self.worker.engine.engine.config.block_size
        self.prompt_hashes = hash_blocks(self.token_ids, block_size, encode_extra_keys((self.router.model.name, "")))
        rng = random.Random(c.seed)
        t0 = time.perf_counter()
        for i in range(c.num_workers):
            hashes = [rng.randbytes(16) for _ in range(c.index_blocks_per_worker)]
            await index.replace(f"w{i}", "device", hashes + (self.prompt_hashes if i == 0 else []))
        hits = await index.leading_hits(self.prompt_hashes, [f"w{i}" for i in range(c.num_workers)])
        assert hits["w0"] == len(self.prompt_hashes) and not any(hits[f"w{i}"] for i in range(1, c.num_workers)), hits
        mem = (await self.redis.info("memory"))["used_memory_human"]
        self.info = {"index_blocks": c.num_workers * c.index_blocks_per_worker + len(self.prompt_hashes),
                     "prompt_tokens": len(self.token_ids), "prompt_blocks": len(self.prompt_hashes),
                     "redis_used_memory": mem, "index_populate_s": round(time.perf_counter() - t0, 1)}
        self.log(f"index: {self.info['index_blocks']:,} blocks in Redis ({mem}) in {self.info['index_populate_s']} s; "
                 f"prompt {len(self.token_ids)} tokens, its {len(self.prompt_hashes)} blocks on w0")

    async def stop(self) -> None:
        for part in (self.server, self.worker):
            if part is not None:
                await part.stop()
        if self.redis is not None:
            await self.redis.aclose()
        if self.redis_server is not None:
            self.redis_server.stop()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ the decision path

    def stage_samples(self, clear: bool = True) -> dict[str, list[float]]:
        out = {k: list(v.samples) for k, v in self.router.metrics.stages.items()}
        if clear:
            for v in self.router.metrics.stages.values():
                v.samples.clear()
        return out

    async def decide(self, req) -> str:
        """Router._dispatch up to the choice of a worker."""
        router = self.router
        workers = [w for w in router.pool.eligible() if w.info.max_model_len > len(req.token_ids)]
        hits = await router._lookup(req, workers)
        return router._pick(req, workers, hits)[0].worker_id

    async def decision_samples(self, n: int) -> tuple[list[float], list[float], dict[str, int]]:
        """(prepare seconds, decision seconds, picks per worker) of `n` text requests. They decide
        on a copy of the router's policy (its churn and traffic memories), as `Router.explain` does:
        the requests sent through the router after them find the policy as those before left it."""
        prepare, decision, picks = [], [], {}
        router = self.router
        policy, router.policy = router.policy, copy.deepcopy(router.policy)
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                req = router._prepare(self.text_input, t0)
                t1 = time.perf_counter()
                worker_id = await self.decide(req)
                decision.append(time.perf_counter() - t1)
                prepare.append(t1 - t0)
                picks[worker_id] = picks.get(worker_id, 0) + 1
        finally:
            router.policy = policy
        return prepare, decision, picks

    async def decision_rate(self, seconds: float, with_redis: bool, concurrency: int = 1) -> float:
        """Decisions per second of the decision path in `concurrency` loops (as requests in flight
        interleave on the router's event loop), the loop's thread on one core."""
        req = self.router._prepare(self.token_input, time.perf_counter())
        saved = self.router.kv_index
        if not with_redis:
            workers = self.router.pool.eligible()
            self.router.kv_index = _AnsweredIndex(await saved.leading_tiers(
                self.prompt_hashes, [w.worker_id for w in workers], self.router.config.index_mediums))
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(cpus)})  # this thread only (Linux): the event loop's
        counts = [0] * concurrency

        async def loop(i: int) -> None:
            while counts[i] % 64 or time.perf_counter() < deadline:
                await self.decide(req)
                counts[i] += 1

        try:
            start = time.perf_counter()
            deadline = start + seconds
            await asyncio.gather(*(loop(i) for i in range(concurrency)))
            return sum(counts) / (time.perf_counter() - start)
        finally:
            os.sched_setaffinity(0, cpus)
            self.router.kv_index = saved

    # ------------------------------------------------------------------ the full path

    async def full_path_samples(self, n: int, offset: int) -> dict[str, list[float]]:
        """Seconds per request: direct to the worker, through the router over gRPC and over HTTP, interleaved."""
        calls = {"direct": self._direct, "router_grpc": self._via_grpc, "router_http": self._via_http}
        names, out = list(calls), {k: [] for k in calls}
        for i in range(n):
            for name in names[i % 3:] + names[:i % 3]:  # rotate the order: no path always goes first
                t0 = time.perf_counter()
                await calls[name](f"{offset + i}")
                out[name].append(time.perf_counter() - t0)
        return out

    async def open_clients(self) -> None:
        import aiohttp
        import grpc

        from kvweave.convert import sampling_to_proto
        from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
        from kvweave.sampling_params import SamplingParams

        self._worker_request, self._router_request = worker_pb2.WorkerGenerateRequest, inference_pb2.GenerateRequest

        self._worker_channel = grpc.aio.insecure_channel(self.worker.address)
        self._router_channel = grpc.aio.insecure_channel(self.server.grpc_address)
        self._worker_stub = worker_pb2_grpc.WorkerStub(self._worker_channel)
        self._router_stub = inference_pb2_grpc.InferenceStub(self._router_channel)
        self._http = aiohttp.ClientSession()
        self._sampling = sampling_to_proto(SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        self._router_sampling = common_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        self.chosen: dict[str, int] = {}

    async def close_clients(self) -> None:
        await self._http.close()
        await self._worker_channel.close()
        await self._router_channel.close()

    async def _direct(self, tag: str) -> None:
        msg = self._worker_request(request_id=f"direct-{tag}", prompt_token_ids=self.token_ids,
                                   sampling=self._sampling)
        last = [r async for r in self._worker_stub.Generate(msg)][-1]
        assert last.finished and last.usage.completion_tokens == 1, last

    async def _via_grpc(self, tag: str) -> None:
        msg = self._router_request(request_id=f"grpc-{tag}", text=self.text, sampling=self._router_sampling)
        last = [r async for r in self._router_stub.Generate(msg)][-1]
        assert last.finished and last.usage.completion_tokens == 1, last
        self.chosen[last.worker_id] = self.chosen.get(last.worker_id, 0) + 1

    async def _via_http(self, tag: str) -> None:
        body = {"model": self.router.model.name, "prompt": self.text, "max_tokens": 1, "temperature": 0}
        async with self._http.post(f"{self.server.http_url}/v1/completions", json=body) as resp:
            doc = await resp.json()
        assert resp.status == 200 and doc["usage"]["completion_tokens"] == 1, doc


def _input(prompt):
    from controlplane.router_types import GenerateInput
    from kvweave.sampling_params import SamplingParams

    return GenerateInput(prompt=prompt, params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))


# ---------------------------------------------------------------------- metrics

async def bench_overhead(b: RouterBench) -> list[Result]:
    c = b.cfg
    await b.decision_samples(50)  # warm-up
    await b.full_path_samples(10, -10)  # warm-up; fills the worker's prefix cache too
    b.stage_samples()
    b.chosen.clear()
    prepare, decision, picks, full = [], [], {}, {"direct": [], "router_grpc": [], "router_http": []}
    dec_stages, full_stages, dec_runs, full_runs = {}, {}, [], []
    for r in range(c.repeats):
        p, d, k = await b.decision_samples(c.num_decisions)
        prepare, decision = prepare + p, decision + d
        for w, n in k.items():
            picks[w] = picks.get(w, 0) + n
        _extend(dec_stages, b.stage_samples())
        f = await b.full_path_samples(c.num_requests, r * c.num_requests)
        _extend(full, f)
        _extend(full_stages, b.stage_samples())
        dec_runs.append(round(percentile(d, 99) * 1e3, 4))
        full_runs.append({k: round(percentile(v, 99) * 1e3, 3) for k, v in f.items()})
        b.log(f"overhead {r + 1}/{c.repeats}: decision p99 {dec_runs[-1]:.3f} ms; p99 direct "
              f"{full_runs[-1]['direct']:.2f} ms, via router gRPC {full_runs[-1]['router_grpc']:.2f} ms, "
              f"HTTP {full_runs[-1]['router_http']:.2f} ms")
    direct, p99 = full["direct"], percentile(decision, 99) * 1e3
    extra = {"p50_ms": _pct_ms(decision, 50), "meets_1ms_target": p99 <= DECISION_TARGET_MS,
             "num_samples": len(decision), "stages": {k: _ms(v) for k, v in dec_stages.items() if v},
             "prepare_incl_tokenize": _ms(prepare),
             "prepare_plus_decision_p99_ms": _pct_ms([a + d for a, d in zip(prepare, decision)], 99),
             "baseline_p50_ms": _pct_ms(direct, 50), "picks": picks, **b.info, "runs": dec_runs,
             "baseline_runs": [x["direct"] for x in full_runs]}
    results = [Result("router_overhead_p99", p99, "ms", "direct gRPC request to a worker (p99)",
                      percentile(direct, 99) * 1e3, False, extra)]
    for path in ("router_grpc", "router_http"):
        xs = full[path]
        extra = {"added_p50_ms": round((percentile(xs, 50) - percentile(direct, 50)) * 1e3, 4),
                 "added_p99_ms": round((percentile(xs, 99) - percentile(direct, 99)) * 1e3, 4),
                 "added_median_of_pairs_ms": round(median([x - d for x, d in zip(xs, direct)]) * 1e3, 4),
                 "p50_ms": _pct_ms(xs, 50), "baseline_p50_ms": _pct_ms(direct, 50),
                 "num_requests": len(xs), "router_stages": {k: _ms(v) for k, v in full_stages.items() if v},
                 "chosen_workers": b.chosen, "runs": [x[path] for x in full_runs],
                 "baseline_runs": [x["direct"] for x in full_runs]}
        results.append(Result("router_overhead_p99_" + path.removeprefix("router_"), percentile(xs, 99) * 1e3, "ms",
                              "direct gRPC request to a worker (p99)", percentile(direct, 99) * 1e3, False, extra))
    return results


def _extend(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for k, v in more.items():
        into.setdefault(k, []).extend(v)


async def bench_rate(b: RouterBench) -> Result:
    c = b.cfg
    await b.decision_rate(0.3, True)  # warm-up
    ours, theirs, sequential = [], [], []
    for r in range(c.repeats):
        ours.append(await b.decision_rate(c.rate_seconds, True, DECISION_CONCURRENCY))
        theirs.append(await b.decision_rate(c.rate_seconds, False, DECISION_CONCURRENCY))
        sequential.append(await b.decision_rate(c.rate_seconds, True, 1))
        b.log(f"decisions {r + 1}/{c.repeats}: {ours[-1]:,.0f}/s with the Redis lookup, {theirs[-1]:,.0f}/s "
              f"without ({DECISION_CONCURRENCY} in flight); one at a time {sequential[-1]:,.0f}/s")
    b.stage_samples()
    value = median(ours)
    extra = {"target_per_s": DECISIONS_TARGET_PER_S, "meets_target": value >= DECISIONS_TARGET_PER_S,
             "index_blocks": b.info.get("index_blocks"), "prompt_tokens": len(b.token_ids),
             "pinned": "event-loop thread on one core; redis-server unpinned",
             "in_flight": DECISION_CONCURRENCY, "one_at_a_time_per_s": round(median(sequential), 1),
             "runs": [round(x, 1) for x in ours], "baseline_runs": [round(x, 1) for x in theirs]}
    return Result("routing_decisions_per_s", value, "1/s", "same loop, Redis lookup answered in-process",
                  median(theirs), True, extra)


# ---------------------------------------------------------------------- CLI

async def run_cluster_metrics(cfg: BenchConfig, model: str | None, metrics: list[str],
                               log) -> tuple[dict, list[Result]]:
    b = RouterBench(cfg, model, log)
    try:
        await b.start()
        await b.open_clients()
        results = []
        if "router_overhead_p99" in metrics:
            log("metric router_overhead_p99")
            results += await bench_overhead(b)
        if "routing_decisions_per_s" in metrics:
            log("metric routing_decisions_per_s")
            results.append(await bench_rate(b))
        await b.close_clients()
        return {"model": model or "tiny random llama (tests/conftest.py, context 2048)", **b.info}, results
    finally:
        await b.stop()
