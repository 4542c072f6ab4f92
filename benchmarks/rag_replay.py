"""`chunk_reuse_vs_sglang`: RAG requests whose passages recur in other orders, replayed through
kvweave's `chunk_aware` policy and through sglang-router, both scored by one cache model.

Requests: loadgen's `rag` workload (loadgen/workloads/rag.py) over MuSiQue (`../shared/data/rag/`)
with `shuffle_docs` (each request presents its question's `num_docs` passages in a fresh order)
and a Zipf-like question popularity, so a recurring question's passages come back at other
positions. Each request is tokenized as the router tokenizes segments (`kvweave.segments.
encode_segments`, the default model's tokenizer): its prefix chain of 16-token blocks
(`kvstore.keys.hash_blocks`, the router's extra keys) and, per passage, its chunk-cache's key and
entry keys (`chunk_hash`, `chunk_block_keys`, as `Router._lookup` makes them). Arrivals are a
Poisson process of `request_rate` per second, seeded.

Both routers are scored by benchmarks/cluster_sim.py's model, which credits chunk reuse: a worker
holding a passage's chunk-cache reuses it at any position beyond the prefix run it holds, where a
prefix tree only sees the prefix. kvweave's policy object sees the exact index (prefix run and
chunk codes); sglang-router 0.3.2 (`cache_aware`, its defaults) gets the prompt's text in front of
fake workers (benchmarks/sglang_peer.py). The figure is chunk-reused tokens per request, kvweave /
sglang (target >= 1.5x), with each side's prefix hit rate, total reuse and request imbalance.
Windows: `RAG_TUNING_WINDOW` is where settings for this replay would be chosen (chunk_aware runs
with its defaults, chosen on Mooncake); rows overlapping it are flagged in-sample.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from benchmarks.cluster_sim import SimConfig, SimRequest, SimResult, replay
from benchmarks.report import Result
from benchmarks.sglang_peer import PeerConfig, PeerUnavailable, replay_prompts
from benchmarks.vs_sglang import held_out, tiers_label
from controlplane.policies import make_policy
from kvstore.keys import chunk_block_keys, chunk_hash, encode_extra_keys, hash_blocks
from kvweave.defaults import BLOCK_SIZE, DEFAULT_MODEL
from kvweave.model_files import LoadedTokenizer, load_tokenizer
from kvweave.segments import encode_segments
from loadgen.workloads.base import DEFAULT_DATASETS
from loadgen.workloads.rag import RagWorkload

RAG_TUNING_WINDOW = (0, 2000)
"""Requests [first, end) of the RAG replay on which its settings are chosen; later windows are held out."""
TARGET_CHUNK_RATIO = 1.5
RAG_CAPACITIES = (1000, 2000)
"""Default per-worker device capacities of the RAG replay, in 16-token blocks (16k and 32k tokens:
7 and 14 of its ~2.2k-token prompts)."""


@dataclass(frozen=True)
class RagReplayConfig:
    dataset: str = str(DEFAULT_DATASETS["rag"])
    num_docs: int = 4
    popularity_skew: float = 1.2
    """Question popularity ~ 1/(rank+1)^skew (loadgen's --popularity-skew)."""
    request_rate: float = 2.0
    """Poisson arrivals per second."""
    output_len: int = 32
    seed: int = 0
    model: str = DEFAULT_MODEL
    """Whose tokenizer (and name, in the hash chain's extra keys) the requests use."""
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.num_docs < 1 or self.request_rate <= 0 or self.output_len < 1 or self.block_size < 1:
            raise ValueError("num_docs, request_rate, output_len and block_size must be positive")


@dataclass(frozen=True)
class RagTrace:
    requests: list[SimRequest]
    prompts: list[str]
    """Each request's text, as sglang-router gets it."""
    questions: list[int]


class _MemoTokenizer:
    """The tokenizer, each distinct text encoded once (the passages recur)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self._ids = tokenizer, {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids


@lru_cache(maxsize=2)
def _loaded_tokenizer(model: str) -> LoadedTokenizer:
    return load_tokenizer(model)


def rag_trace(cfg: RagReplayConfig, num_requests: int, offset: int = 0) -> RagTrace:
    """Requests [offset, offset + num_requests) of the shuffled-passage RAG replay (deterministic in the seed)."""
    loaded = _loaded_tokenizer(cfg.model)
    tokenizer = _MemoTokenizer(loaded.tokenizer)
    extra = encode_extra_keys((loaded.name, ""))
    workload = RagWorkload(cfg.dataset, num_docs=cfg.num_docs, popularity_skew=cfg.popularity_skew,
                           shuffle_docs=True, output_len=cfg.output_len, seed=cfg.seed)
    rng, t = random.Random(cfg.seed), 0.0
    requests, prompts, questions = [], [], []
    chunk_keys: dict[tuple[int, ...], list[bytes]] = {}
    for k, session in enumerate(itertools.islice(workload.sessions(), offset + num_requests)):
        t += rng.expovariate(cfg.request_rate)
        if k < offset:
            continue
        segments = session.turns[0].segments
        token_ids, spans = encode_segments(tokenizer, segments, add_special_tokens=True)
        entries = []
        for a, n in spans:
            chunk = tuple(token_ids[a:a + n])
            if chunk not in chunk_keys:
                chunk_keys[chunk] = chunk_block_keys(chunk_hash(chunk, extra), n, cfg.block_size)
            entries.append(chunk_keys[chunk])
        requests.append(SimRequest(round(t, 3), len(token_ids), cfg.output_len,
                                   hash_blocks(token_ids, cfg.block_size, extra), spans, entries))
        prompts.append("".join(text for text, _ in segments))
        questions.append(session.tags["question"])
    return RagTrace(requests, prompts, questions)


def in_sample(offset: int, num_requests: int) -> bool:
    first, end = RAG_TUNING_WINDOW
    return offset < end and offset + num_requests > first


def _side(r: SimResult) -> dict:
    return {"chunk_tokens_per_request": round(r.chunk_tokens_per_request, 1),
            "prefix_hit_rate": round(r.hit_rate, 4), "reuse_rate": round(r.reuse_rate, 4),
            "weighted_hit_rate": round(r.weighted_hit_rate, 4), "imbalance": round(r.imbalance, 3),
            "requests_per_worker": r.requests_per_worker, "hit_blocks_by_tier": r.hit_blocks_by_tier,
            "chunk_tokens_by_tier": r.chunk_tokens_by_tier}


def compare_rag_window(trace: RagTrace, offset: int, cfg: SimConfig, peer: PeerConfig, rag: RagReplayConfig,
                       log=lambda msg: None) -> Result:
    """One row: chunk_aware and sglang-router on one window at one capacity."""
    ours = replay(trace.requests, cfg, "chunk_aware", policy=make_policy("chunk_aware"))
    run = replay_prompts(trace.requests, trace.prompts, cfg, peer)
    theirs = replay(trace.requests, cfg, "sglang", choices=run.choices)
    ratio = (ours.chunk_tokens_per_request / theirs.chunk_tokens_per_request if theirs.chunk_tokens_per_request
             else float("inf"))
    n = len(trace.requests)
    log(f"rag vs sglang: requests {offset}-{offset + n - 1}, {cfg.capacity_blocks} blocks{tiers_label(cfg)}: "
        f"chunk tokens/request "
        f"kvweave {ours.chunk_tokens_per_request:.1f}, sglang {theirs.chunk_tokens_per_request:.1f} ({ratio:.2f}x); "
        f"reuse {ours.reuse_rate:.4f} / {theirs.reuse_rate:.4f}; "
        f"imbalance {ours.imbalance:.3f} / {theirs.imbalance:.3f}")
    extra = {"first_request": offset, "num_requests": n, "held_out": not in_sample(offset, n),
             "tuning_window": list(RAG_TUNING_WINDOW), "capacity_blocks": cfg.capacity_blocks,
             "dram_blocks": cfg.dram_blocks, "ssd_blocks": cfg.ssd_blocks, "block_tokens": cfg.block_size,
             "num_workers": cfg.num_workers, "ms_per_token": cfg.ms_per_token,
             "mean_prompt_tokens": round(ours.prompt_tokens / n, 1) if n else 0.0,
             "distinct_questions": len(set(trace.questions)), "rag": dataclasses.asdict(rag),
             "policy": "chunk_aware (defaults)", "target_ratio": TARGET_CHUNK_RATIO,
             "imbalance": round(ours.imbalance, 3), "sglang_imbalance": round(theirs.imbalance, 3),
             "kvweave": _side(ours), "sglang": _side(theirs), "sglang_version": run.version,
             "sglang_policy": peer.policy, "speedup": peer.speedup, "sglang_wall_s": run.wall_s,
             "send_lateness_trace_ms": run.lateness_ms, "arrivals_out_of_send_order": run.reordered}
    return Result("chunk_reuse_vs_sglang", ours.chunk_tokens_per_request, "tokens/request",
                  f"sglang-router {run.version} {peer.policy}", theirs.chunk_tokens_per_request, True, extra)


def rag_summary(rows: Sequence[Result]) -> Result | None:
    """The held-out rows' mean ratio, against parity, with the target checked."""
    found = held_out(rows)
    if found is None:
        return None
    _, mean, extra = found
    extra |= {"target_ratio": TARGET_CHUNK_RATIO, "meets_target": extra["min_ratio"] >= TARGET_CHUNK_RATIO}
    return Result("chunk_reuse_vs_sglang_heldout_mean", mean, "x", "parity with sglang-router", 1.0, True, extra)


def bench_rag_vs_sglang(rag: RagReplayConfig, num_requests: int, offsets: Sequence[int], capacities: Sequence[int],
                        cfg: SimConfig, peer: PeerConfig, log=lambda msg: None) -> tuple[list[Result], str | None]:
    """Every (offset, capacity) row and the held-out summary; ([], why) when sglang-router cannot run."""
    rows = []
    cfg = dataclasses.replace(cfg, block_size=rag.block_size)
    for offset in offsets:
        trace = rag_trace(rag, num_requests, offset)
        for capacity in capacities:
            try:
                rows.append(compare_rag_window(trace, offset, dataclasses.replace(cfg, capacity_blocks=capacity),
                                               peer, rag, log))
            except PeerUnavailable as exc:
                log(f"rag vs sglang: not measured: {exc}")
                return [], str(exc)
    total = rag_summary(rows)
    return rows + ([total] if total else []), None

