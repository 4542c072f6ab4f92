"""`onboard_vs_recompute_512` of `kvweave bench kvstore`: the engine (default model) loading 512 tokens
(32 blocks) of KV from its DRAM tier, and from its SSD tier, into its KV cache
(`KVConnector.load_external`), against computing the same 512 tokens' KV (one prefill forward);
`extra` has the TTFT of a 513-token request whose first 512 tokens come from each tier against a
cold one.
"""
from __future__ import annotations

import tempfile
import time

from benchmarks.report import Result, median


def bench_onboard(model: str, repeats: int, directory: str | None) -> list[Result]:
    """`model`: the engine's model; `repeats`: timed runs per measurement (their median is reported)."""
    import random

    from worker.engine import EngineConfig, LLMEngine
    from worker.request import Request
    from kvweave.sampling_params import SamplingParams

    ntok = 512
    with tempfile.TemporaryDirectory(prefix="kvweave-bench-onboard-", dir=directory) as tmp:
        engine = LLMEngine(EngineConfig(model=model, kv_cache_gb=0.25, dram_cache_gb=0.25, ssd_cache_gb=0.25,
                                        ssd_cache_dir=tmp, max_num_batched_tokens=1024))
        try:
            return _onboard(engine, repeats, ntok, random.Random(0), Request, SamplingParams)
        finally:
            engine.close()


def _onboard(engine, repeats, ntok, rng, Request, SamplingParams) -> list[Result]:
    conn, store, bs = engine.connector, engine.store, engine.config.block_size
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = engine.args.vocab_size

    def prompt() -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(ntok + 1)]

    def ttft(tokens) -> float:
        t0 = time.perf_counter()
        engine.generate([tokens], one)
        return time.perf_counter() - t0

    def onboard_seconds(tokens, tier: str) -> float:
        """Load the prompt's 32 blocks from `tier` into fresh device blocks (the scheduler's call)."""
        req = Request("onboard", tokens, one, cache_extra=engine.make_request(tokens).cache_extra)
        hashes = engine.block_manager.block_hashes(req.req_id, tokens, req.cache_extra)[:ntok // bs]
        assert all(store.where(h) == tier for h in hashes), [store.where(h) for h in hashes]
        assert engine.block_manager.allocate_slots(req.req_id, ntok)
        t0 = time.perf_counter()
        loaded = conn.load_external(req, 0, len(hashes))
        seconds = time.perf_counter() - t0
        assert loaded == len(hashes)
        engine.block_manager.free(req.req_id)
        engine.block_manager.req_hashes.pop(req.req_id, None)
        return seconds

    def evict_device() -> None:
        engine.block_manager.reset_prefix_cache()

    def place(tokens, tier: str) -> None:
        """Compute the prompt, then move its blocks to `tier` only."""
        engine.generate([tokens], one)
        hashes = engine.block_manager.block_hashes("place", tokens, engine.make_request(tokens).cache_extra)[:ntok // bs]
        engine.block_manager.req_hashes.pop("place", None)
        for h in hashes:
            block = engine.block_manager.cached_blocks[h]
            value = conn.device.view(block.block_id)
            for t in store.tiers:
                if t.name == tier:
                    t.put(h, value.clone())
                else:
                    t.remove(h)
        evict_device()

    recompute, loads, ttfts = [], {"dram": [], "ssd": []}, {"dram": [], "ssd": [], "cold": []}
    ttft(prompt())  # warm up
    for _ in range(repeats):
        cold = prompt()
        ttfts["cold"].append(ttft(cold))
        evict_device()
        recompute.append(_prefill_seconds(engine, prompt()[:ntok]))
        for tier in ("dram", "ssd"):
            tokens = prompt()
            place(tokens, tier)
            loads[tier].append(onboard_seconds(tokens, tier))
            place(tokens, tier)
            ttfts[tier].append(ttft(tokens))
            evict_device()
    base = median(recompute) * 1000
    results = []
    for tier in ("dram", "ssd"):
        results.append(Result(f"onboard_vs_recompute_512_{tier}", median(loads[tier]) * 1000, "ms",
                              "recompute 512 tokens", base, higher_is_better=False,
                              extra={"ttft_ms": round(median(ttfts[tier]) * 1000, 1),
                                     "ttft_cold_ms": round(median(ttfts["cold"]) * 1000, 1)}))
    return results


def _prefill_seconds(engine, tokens: list[int]) -> float:
    """One forward computing the KV of `tokens` (as the engine's prefill step runs it)."""
    from worker.scheduler import ScheduledRequest, SchedulerOutput
    from kvweave.sampling_params import SamplingParams

    bm = engine.block_manager
    assert bm.allocate_slots("prefill-bench", len(tokens))
    sched = SchedulerOutput([ScheduledRequest("prefill-bench", tokens, 0, bm.get_block_table("prefill-bench"), True)])
    params = {"prefill-bench": SamplingParams(temperature=0.0, max_tokens=1)}
    t0 = time.perf_counter()
    engine.runner.execute(sched, params, {"prefill-bench": None})
    seconds = time.perf_counter() - t0
    bm.free("prefill-bench")
    return seconds
