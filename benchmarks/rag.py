"""`kvweave bench rag`: chunk-cache reuse on MuSiQue against full prefill and the published methods.

Each question's prompt is an instruction prefix, its K passages (one reusable chunk each, `Passage:
<text>\\n`) and the question, in the chat format of the default model; each piece is tokenized on
its own so every method sees the same token ids. The passages' chunk-caches are computed
beforehand (not timed): each passage after the instruction prefix, re-based to position 0 and
kept in the engine's DRAM tier under the chunk's hash, where the engine finds them as it would
any chunk-cache. Side by side in one run:
- full prefill; prefix caching only (the instruction prefix is cached);
- naive reuse (placed caches, nothing recomputed);
- CacheBlend (layer-1 value-deviation selection of the same share of tokens, no correction);
- chunk-start (the first tokens of every chunk, same share, no correction);
- kvweave (the engine's default: chunk starts + an even sample, with the dense correction).
Quality: teacher-forced on full prefill's first 32 greedy tokens, the share of positions whose
top-1 token matches full prefill's (agreement) and the mean KL(full || method). TTFT: the real
engine for full, prefix caching, naive and kvweave (a fresh cache namespace per request so only
the intended KV is reused); CacheBlend and chunk-start run on the probe path
(`worker.chunk_reuse`), timed against full prefill on that same path. Prefill compute: FLOPs of
the linear layers and attention actually run, counting CacheBlend's full pass over layers 0-1.
Answer F1: SQuAD token F1 of the greedy answers of full prefill and kvweave against the gold ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from benchmarks.report import Result, render, write_json

DEFAULT_DATASET = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rag",
                               "musique_dev.json")
PREFIX = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nYou will be asked a "
          "question after reading several passages. Please directly answer the question based on the given "
          "passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n")
QUESTION = ("\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. The answer "
            "should be within 5 words. \nQuestion: {q}<|im_end|>\n<|im_start|>assistant\n")
ANSWER_TOKENS = 32


@dataclass
class RagConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    dataset: str = DEFAULT_DATASET
    questions: int = 12
    f1_questions: int = 0
    """Questions for answer F1 (at least `questions`; the extra ones run only the answers)."""
    docs: int = 10
    threads: int = 2


# ------------------------------------------------------------------------------ quality helpers

def kl_and_agreement(full: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    lp, lq = full.float().log_softmax(-1), other.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    agree = (full.argmax(-1) == other.argmax(-1)).float().mean()
    return float(agree), float(kl)


def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, golds: list[str]) -> float:
    best = 0.0
    pred = _normalize(prediction)
    for gold in golds:
        g = _normalize(gold)
        common = sum((Counter(pred) & Counter(g)).values())
        if common:
            p, r = common / len(pred), common / len(g)
            best = max(best, 2 * p * r / (p + r))
    return best


def prefill_flops(args, positions: list[int] | range, context_of=None, layers: int | None = None) -> float:
    """FLOPs of running tokens at `positions` through `layers` layers: the linear layers (2 x
    weights) and attention (QK and PV over the context up to each position)."""
    d, hd, L = args.dim, args.head_dim, layers or args.n_layers
    per_layer = 2 * (d * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * d + 3 * d * args.hidden_dim)
    n = len(positions)
    attn = 4 * args.n_heads * hd * sum(p + 1 for p in positions)
    return L * (n * per_layer + attn)


# ------------------------------------------------------------------------------ one question

class Question:
    def __init__(self, item: dict, tok, docs: int) -> None:
        enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
        self.prefix = enc(PREFIX)
        self.chunks = [enc("Passage: " + c["text"] + "\n") for c in item["ctxs"][:docs]]
        self.question = enc(QUESTION.format(q=item["question"]))
        self.answers = list(item.get("answers") or [])
        self.tokens = self.prefix + sum(self.chunks, []) + self.question
        spans, pos = [], len(self.prefix)
        for c in self.chunks:
            spans.append((pos, len(c)))
            pos += len(c)
        self.spans = spans


def _probe_logits(engine, q: Question, answer: list[int], method: str, ratio: float, caches) -> torch.Tensor:
    """Teacher-forced logits [len(answer), V] of a method on the probe path."""
    from worker.chunk_blend import piece_correction, place_chunks, plan_blend, select_offsets
    from worker.chunk_reuse import _Sequence, deviation_select
    from worker.model import rope_inv_freq

    forced = q.question + answer[:-1]
    total = len(q.tokens) + len(answer)
    seq = _Sequence(engine, total, f"rag-{method}")
    try:
        if method == "full":
            return seq.forward(q.tokens + answer[:-1], torch.arange(total - 1), last=len(answer))
        seq.forward(q.prefix, torch.arange(len(q.prefix)))
        staged = {i: c for i, c in enumerate(caches)}
        if method in ("naive", "chunk_start", "kvweave"):
            r = 0.0 if method == "naive" else ratio
            select = _chunk_start if method == "chunk_start" else select_offsets
            plan = plan_blend(q.spans, staged, len(q.prefix), len(q.tokens), r, 1 << 30, select)
            place_chunks(engine.runner.kv_cache, plan, seq.slots, rope_inv_freq(engine.args))
            if plan.positions:
                corr = None
                if method == "kvweave" and engine.config.chunk_correction:
                    corr = piece_correction(plan, 0, len(plan.positions), seq.slots, engine.model.rope_cos,
                                            engine.model.rope_sin)
                seq.forward([q.tokens[i] for i in plan.positions], torch.tensor(plan.positions), sparse=True,
                            correction=corr)
        elif method == "cacheblend":
            plan = plan_blend(q.spans, staged, len(q.prefix), len(q.tokens), 0.0, 1 << 30)
            place_chunks(engine.runner.kv_cache, plan, seq.slots, rope_inv_freq(engine.args))
            reused = [p for s, n in q.spans for p in range(s, s + n)]
            chosen = deviation_select(seq, reused, [q.tokens[p] for p in reused], ratio)
            if chosen:
                seq.forward([q.tokens[p] for p in chosen], torch.tensor(chosen), sparse=True)
        else:
            raise ValueError(method)
        start = len(q.tokens) - len(q.question)
        return seq.forward(forced, torch.arange(start, start + len(forced)), last=len(answer))
    finally:
        seq.free()


def _chunk_start(n: int, ratio: float) -> list[int]:
    """The chunk-start baseline: as many tokens as kvweave's default selection, all from the start."""
    from worker.chunk_blend import select_offsets

    return list(range(len(select_offsets(n, ratio))))


# ------------------------------------------------------------------------------ engine runs

def _ttft(engine, tokens: list[int], namespace: str, spans=(), keep_cache: bool = False) -> tuple[float, object]:
    """Time to the first token of one request alone. The device prefix cache is emptied first
    (unless `keep_cache`), so that no request pays for evicting (and demoting) another's blocks."""
    from kvweave.sampling_params import SamplingParams

    if not keep_cache:
        engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    rid = engine.add_request(tokens, SamplingParams(max_tokens=1, temperature=0.0), cache_namespace=namespace,
                             chunk_spans=spans)
    while True:
        for out in engine.step():
            if out.req_id == rid and out.finished:
                return time.perf_counter() - t0, out


def _generate(engine, tokens: list[int], namespace: str, spans=()) -> list[int]:
    from kvweave.sampling_params import SamplingParams

    rid = engine.add_request(tokens, SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0),
                             cache_namespace=namespace, chunk_spans=spans)
    while True:
        for out in engine.step():
            if out.req_id == rid and out.finished:
                return list(out.token_ids)


def _store_caches(engine, q: Question, caches, namespace: str) -> None:
    from kvstore.chunks import store_chunk
    from kvstore.keys import chunk_hash, encode_extra_keys

    extra = encode_extra_keys((engine.model_name, namespace))
    for c, kv in zip(q.chunks, caches):
        if not store_chunk(engine.store, chunk_hash(c, extra), kv, engine.config.block_size):
            raise RuntimeError("the DRAM tier is too small for the chunk-caches")


def _standalone_caches(engine, q: "Question") -> list[torch.Tensor]:
    """Each passage's KV computed after the instruction prefix, re-based to position 0."""
    from worker.chunk_reuse import compute_chunk_cache, rotate_keys_
    from worker.model import rope_inv_freq

    caches = []
    for c in q.chunks:
        cache = compute_chunk_cache(engine, c, prefix=q.prefix)
        rotate_keys_(cache.kv[0], -cache.base, rope_inv_freq(engine.args))
        caches.append(cache.kv)
    return caches


def _answers(engine, q: "Question", caches, qi: int, f1: dict) -> list[int]:
    """Full prefill's greedy answer (the teacher of the quality metrics) and kvweave's own, both
    through the engine; adds their token F1 against the gold answers to `f1`."""
    answer = _generate(engine, q.tokens, f"full-{qi}")
    _store_caches(engine, q, caches, f"answer-{qi}")
    own = _generate(engine, q.tokens, f"answer-{qi}", q.spans)
    tok = engine.tokenizer
    stop = set(tok.eos_token_ids) | set(engine.args.eos_token_ids)
    text = lambda ids: tok.decode([t for t in ids if t not in stop]).split("\n")[0]  # noqa: E731
    f1["full"] += token_f1(text(answer), q.answers)
    f1["kvweave"] += token_f1(text(own), q.answers)
    return answer


METHODS = ("full", "prefix_caching", "naive", "cacheblend", "chunk_start", "kvweave", "naive_in_context",
           "kvweave_in_context")
"""`*_in_context`: the same, with chunk-caches kept from an earlier prompt that had the same passages in
another order (computed in context, re-based to position 0), instead of computed on their own."""


def in_context_caches(engine, q: "Question", seed: int) -> list[torch.Tensor]:
    """Each passage's KV from the prompt instruction + the passages in a shuffled order, re-based to 0."""
    import random

    from worker.chunk_reuse import _Sequence, rotate_keys_
    from worker.model import rope_inv_freq

    order = list(range(len(q.chunks)))
    random.Random(seed).shuffle(order)
    tokens = q.prefix + sum((q.chunks[i] for i in order), [])
    seq = _Sequence(engine, len(tokens), "rag-in-context")
    try:
        seq.forward(tokens, torch.arange(len(tokens)))
        out, pos = {}, len(q.prefix)
        for i in order:
            kv = seq.read(pos, len(q.chunks[i]))
            rotate_keys_(kv[0], -pos, rope_inv_freq(engine.args))
            out[i] = kv
            pos += len(q.chunks[i])
        return [out[i] for i in range(len(q.chunks))]
    finally:
        seq.free()


def run_benchmark(cfg: RagConfig) -> tuple[dict, list[Result]]:
    from worker.chunk_blend import select_offsets
    from worker.engine import EngineConfig, LLMEngine

    torch.set_flush_denormal(True)
    with open(cfg.dataset) as f:
        all_items = json.load(f)
    items = all_items[:cfg.questions]
    engine = LLMEngine(EngineConfig(model=cfg.model, dtype=cfg.dtype, kv_cache_gb=1.0, num_threads=cfg.threads,
                                    max_num_batched_tokens=16384, dram_cache_gb=2.0))
    ratio = engine.config.chunk_recompute_ratio
    args, tok = engine.args, engine.tokenizer
    sums = {m: {"agree": 0.0, "kl": 0.0, "flops": 0.0, "ttft": 0.0} for m in METHODS}
    probe_ttft = {m: 0.0 for m in ("full", "cacheblend", "chunk_start", "kvweave")}
    f1 = {"full": 0.0, "kvweave": 0.0}
    n_tokens = 0
    warm = Question(items[0], tok, cfg.docs)  # first-call costs (allocations, kernels) are not timed
    _ttft(engine, warm.tokens, "warmup")
    for qi, item in enumerate(items):
        q = Question(item, tok, cfg.docs)
        n_tokens += len(q.tokens)
        caches = _standalone_caches(engine, q)
        # Engine TTFTs (fresh namespaces: only the intended KV is reused).
        t, _ = _ttft(engine, q.tokens, f"full-{qi}")
        sums["full"]["ttft"] += t
        _ttft(engine, q.prefix + q.chunks[0][:1], f"prefix-{qi}")
        t, out = _ttft(engine, q.tokens, f"prefix-{qi}", keep_cache=True)
        sums["prefix_caching"]["ttft"] += t
        num_prefix_hit = out.num_cached_tokens
        for method, r in (("naive", 0.0), ("kvweave", ratio)):
            engine.blender.ratio = r
            _store_caches(engine, q, caches, f"{method}-{qi}")
            t, out = _ttft(engine, q.tokens, f"{method}-{qi}", q.spans)
            sums[method]["ttft"] += t
        engine.blender.ratio = ratio
        answer = _answers(engine, q, caches, qi, f1)
        # Quality (teacher-forced) and probe-path TTFTs.
        full_logits = None
        for method in ("full", "naive", "cacheblend", "chunk_start", "kvweave"):
            t0 = time.perf_counter()
            logits = _probe_logits(engine, q, answer, method, ratio, caches)
            if method in probe_ttft:
                probe_ttft[method] += time.perf_counter() - t0
            if method == "full":
                full_logits = logits
            a, kl = kl_and_agreement(full_logits, logits)
            sums[method]["agree"] += a
            sums[method]["kl"] += kl
        in_context = in_context_caches(engine, q, qi)
        for method in ("naive", "kvweave"):
            a, kl = kl_and_agreement(full_logits, _probe_logits(engine, q, answer, method, ratio, in_context))
            sums[method + "_in_context"]["agree"] += a
            sums[method + "_in_context"]["kl"] += kl
        sums["prefix_caching"]["agree"] += 1.0  # the same computation as full prefill
        # Prefill FLOPs.
        n = len(q.tokens)
        qpos = range(n - len(q.question), n)
        sel = [s + o for s, m in q.spans for o in select_offsets(m, ratio)]
        first = [s + o for s, m in q.spans for o in _chunk_start(m, ratio)]
        reused = [p for s, m in q.spans for p in range(s, s + m)]
        n_cb = round(ratio * len(reused))
        sums["full"]["flops"] += prefill_flops(args, range(n))
        sums["prefix_caching"]["flops"] += prefill_flops(args, range(num_prefix_hit, n))
        sums["naive"]["flops"] += prefill_flops(args, qpos)
        sums["kvweave"]["flops"] += prefill_flops(args, sel) + prefill_flops(args, qpos)
        sums["kvweave_in_context"]["flops"] += prefill_flops(args, sel) + prefill_flops(args, qpos)
        sums["naive_in_context"]["flops"] += prefill_flops(args, qpos)
        sums["chunk_start"]["flops"] += prefill_flops(args, first) + prefill_flops(args, qpos)
        cb_sel = reused[::max(1, len(reused) // max(n_cb, 1))][:n_cb]  # spread like its choices
        sums["cacheblend"]["flops"] += (prefill_flops(args, reused, layers=2) + prefill_flops(args, cb_sel)
                                        + prefill_flops(args, qpos))
        print(f"question {qi + 1}/{len(items)}: {n} tokens, prefix hit {num_prefix_hit}", file=sys.stderr, flush=True)
    for qi in range(len(items), max(cfg.f1_questions, len(items))):  # more answers for F1 only
        q = Question(all_items[qi], tok, cfg.docs)
        _answers(engine, q, _standalone_caches(engine, q), qi, f1)
        print(f"answer F1 question {qi + 1}/{cfg.f1_questions}", file=sys.stderr, flush=True)
    n_f1 = max(cfg.f1_questions, len(items))
    k = len(items)
    avg = {m: {key: v / k for key, v in d.items()} for m, d in sums.items()}
    pt = {m: v / k for m, v in probe_ttft.items()}
    kv, full, pc, cb = avg["kvweave"], avg["full"], avg["prefix_caching"], avg["cacheblend"]
    by_method = {m: {"agreement": round(avg[m]["agree"], 4), "kl": round(avg[m]["kl"], 5),
                     "prefill_gflops": round(avg[m]["flops"] / 1e9, 6),
                     **({"ttft_ms": round(avg[m]["ttft"] * 1000, 1)} if avg[m]["ttft"] else {}),
                     **({"probe_ttft_ratio": round(pt["full"] / pt[m], 2)} if m in pt and m != "full" else {})}
                 for m in METHODS}
    results = [
        Result("ttft_vs_full_prefill", kv["ttft"] * 1000, "ms", "full prefill (engine)", full["ttft"] * 1000,
               higher_is_better=False, extra={"target": ">= 4"}),
        Result("prefill_compute_vs_prefix_caching", kv["flops"] / 1e9, "GFLOP", "prefix caching only",
               pc["flops"] / 1e9, higher_is_better=False,
               extra={"reduction": round(1 - kv["flops"] / pc["flops"], 4), "target": ">= 0.60 less"}),
        Result("prefill_compute_vs_full", kv["flops"] / 1e9, "GFLOP", "full prefill", full["flops"] / 1e9,
               higher_is_better=False,
               extra={"reduction": round(1 - kv["flops"] / full["flops"], 4), "target": ">= 0.85 less"}),
        Result("quality_agreement", kv["agree"], "share", "naive reuse", avg["naive"]["agree"],
               extra={"target": ">= 0.95", "by_method": by_method}),
        Result("quality_kl", kv["kl"], "nats", "naive reuse", avg["naive"]["kl"], higher_is_better=False,
               extra={"target": "<= 0.05"}),
        Result("kl_vs_cacheblend", kv["kl"], "nats", "CacheBlend (layer-1 deviation, same share)", cb["kl"],
               higher_is_better=False,
               extra={"target": ">= 1.5", "kvweave_probe_ttft_ratio": round(pt["full"] / pt["kvweave"], 2),
                      "cacheblend_probe_ttft_ratio": round(pt["full"] / pt["cacheblend"], 2)}),
        Result("answer_f1", f1["kvweave"] / n_f1 * 100, "points", "full prefill", f1["full"] / n_f1 * 100,
               extra={"difference": round((f1["kvweave"] - f1["full"]) / n_f1 * 100, 2), "questions": n_f1,
                      "target": "within 1 point"}),
    ]
    config = {"model": cfg.model, "dtype": str(engine.model.dtype).removeprefix("torch."), "dataset":
              os.path.relpath(cfg.dataset), "questions": k, "docs": cfg.docs, "recompute_ratio": ratio,
              "correction": engine.config.chunk_correction, "mean_prompt_tokens": round(n_tokens / k),
              "answer_tokens": ANSWER_TOKENS, "threads": cfg.threads, "caches": "standalone after the instruction"}
    engine.close()
    return config, results


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("rag", help="chunk-cache reuse on MuSiQue: TTFT, prefill FLOPs and fidelity to full prefill "
                                    "against prefix caching, naive reuse, CacheBlend and chunk-start selection")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="MuSiQue-format JSON (ctxs, question, answers)")
    p.add_argument("--questions", type=int, default=RagConfig.questions, help="questions to run (from the start)")
    p.add_argument("--f1-questions", type=int, default=0,
                   help="answer F1 over this many questions (the ones past --questions run only the answers)")
    p.add_argument("--docs", type=int, default=RagConfig.docs, help="passages per prompt (K)")
    p.add_argument("--model", default=RagConfig.model, help="model (default: smollm2-135m)")
    p.add_argument("--dtype", default=RagConfig.dtype, help="auto | bfloat16 | float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.dataset):
        print(f"error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    if args.questions < 1 or args.docs < 1:
        print("error: --questions and --docs must be positive", file=sys.stderr)
        return 2
    try:
        with open(args.dataset) as f:
            data = json.load(f)
        if not isinstance(data, list) or not all(isinstance(x, dict) and "ctxs" in x and "question" in x
                                                 for x in data[:max(args.questions, args.f1_questions)]):
            raise ValueError("expected a list of objects with ctxs and question")
    except (OSError, ValueError) as e:
        print(f"error: dataset {args.dataset} is not a MuSiQue-format JSON list: {e}", file=sys.stderr)
        return 2
    cfg = RagConfig(model=args.model, dtype=args.dtype, dataset=args.dataset, questions=args.questions,
                    docs=args.docs, f1_questions=args.f1_questions)
    config, results = run_benchmark(cfg)
    print(render("rag", config, results))
    for m, d in results[3].extra["by_method"].items():
        print(f"  {m:<16} " + "  ".join(f"{k}={v}" for k, v in d.items()))
    if args.json:
        write_json(args.json, "rag", config, results)
    return 0
