"""`kvweave bench rag`: chunk-cache reuse on MuSiQue, through the serving engine, against full
prefill and the published methods.

Each question's prompt is an instruction prefix, its K passages (one reusable chunk each, `Passage:
<text>\\n`) and the question, in the chat format of the default model; each piece is tokenized on
its own so every method sees the same token ids. Every arm is an `LLMEngine` configured as a user
would configure it (`ARMS`), serving the request with its chunk spans; nothing runs outside the
serving path:
- full prefill; prefix caching only (the instruction prefix cached; its KV is exact, so its
  fidelity is 1 by construction and not re-measured);
- naive reuse (chunk-caches placed, nothing recomputed);
- kvweave (the engine's defaults: chunk starts and an even sample, with the dense correction);
- chunk-start (as many tokens, all from each chunk's start, no correction);
- CacheBlend (`chunk_selection=deviation`: a layer-0/1 pass over every reused token, the most
  deviant share recomputed) at its published 15% and at kvweave's share, and CacheBlend's selection
  with kvweave's correction;
- the engine's `in_context` chunk-cache mode, naive and at kvweave's share: caches kept from an
  earlier prompt that had the same passages in another order.
Standalone chunk-caches are made by the kvweave engine itself (standalone mode: after a first prompt
with the passages, its engine-made requests compute each passage after the instruction); the time
that takes is reported, and amortised over `--reuses` reuses in `ttft_with_cache_build`. Other arms
get the same caches copied into their DRAM tiers (as a peer transfer would). The engine's own
request for the first passage leaves the instruction and that passage as exact prefix blocks (in
DRAM), which the measured prompt finds; every arm gets the same prefix blocks, so in every arm the
first passage is a prefix hit and the K-1 others are reused as chunk-caches.
Quality: teacher-forced on full prefill's first 32 greedy tokens, through the engine (the request
asks for the logits of its last prompt positions): the share of positions whose top-1 token matches
full prefill's (agreement) and the mean KL(full || method). TTFT: each arm's request alone, its
device prefix cache emptied first. Prefill compute: FLOPs of the linear layers and attention of the
positions each method runs (CacheBlend's pass over layers 0-1 included). Answer F1: SQuAD token F1 of
the greedy answers of full prefill and kvweave against the gold ones.
The defaults were chosen on questions 0-49; the reported run starts at `--question-offset` (50).
"""
from __future__ import annotations

import argparse
import json
import os
import random
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
TUNED_ON = (0, 50)
"""Questions [0, 50) are where the engine's chunk-reuse defaults were chosen."""
CACHEBLEND_RATIO = 0.15
"""CacheBlend's published recompute share."""


@dataclass
class RagConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    dataset: str = DEFAULT_DATASET
    questions: int = 12
    question_offset: int = TUNED_ON[1]
    """First question run (default: the first one the defaults were not tuned on)."""
    f1_questions: int = 0
    """Questions for answer F1 (at least `questions`; the extra ones run only the answers)."""
    docs: int = 10
    threads: int = 2
    reuses: int = 5
    """Reuses over which building a standalone chunk-cache is amortised."""
    ratio: float | None = None
    """kvweave's recompute share (None: the engine's default)."""
    kv_cache_gb: float = 0.25
    """Each engine's device KV cache."""
    dram_cache_gb: float = 0.5
    """Each engine's DRAM tier (it holds the standalone chunk-caches)."""


@dataclass(frozen=True)
class Arm:
    name: str
    config: tuple[tuple[str, object], ...] = ()
    """EngineConfig overrides ("ratio" stands for kvweave's share)."""
    caches: str = "standalone"
    """standalone | in_context | none (no chunks: full prefill)."""


ARMS = (
    Arm("full", caches="none"),
    Arm("prefix_caching", caches="none"),
    Arm("naive", (("chunk_recompute_ratio", 0.0),)),
    Arm("kvweave"),
    Arm("chunk_start", (("chunk_selection", "chunk_start"), ("chunk_correction", False))),
    Arm("cacheblend", (("chunk_selection", "deviation"), ("chunk_recompute_ratio", CACHEBLEND_RATIO),
                       ("chunk_correction", False))),
    Arm("cacheblend_same_share", (("chunk_selection", "deviation"), ("chunk_correction", False))),
    Arm("cacheblend_corrected", (("chunk_selection", "deviation"),)),
    Arm("naive_in_context", (("chunk_recompute_ratio", 0.0), ("chunk_cache_mode", "in_context")), "in_context"),
    Arm("kvweave_in_context", (("chunk_cache_mode", "in_context"),), "in_context"),
)
METHODS = tuple(a.name for a in ARMS)


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


def prefill_flops(args, positions: list[int] | range, layers: int | None = None) -> float:
    """FLOPs of running tokens at `positions` through `layers` layers: the linear layers (2 x
    weights) and attention (QK and PV over the context up to each position)."""
    d, hd, L = args.dim, args.head_dim, layers or args.n_layers
    per_layer = 2 * (d * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * d + 3 * d * args.hidden_dim)
    attn = 4 * args.n_heads * hd * sum(p + 1 for p in positions)
    return L * (len(positions) * per_layer + attn)


def arm_flops(arm: Arm, args, q: "Question", ratio: float, num_cached: int) -> float:
    """Prefill FLOPs of one arm on one question: the positions its engine runs past the
    `num_cached` tokens its prefix cache served."""
    from worker.chunk_blend import SELECTORS

    n = len(q.tokens)
    if arm.caches == "none":
        return prefill_flops(args, range(num_cached, n))
    cfg = dict(arm.config)
    share = cfg.get("chunk_recompute_ratio", ratio)
    text = [p for p in range(num_cached, n) if not any(s <= p < s + m for s, m in q.spans)]
    selection = cfg.get("chunk_selection", "kvweave")
    if selection != "deviation":
        chosen = [s + o for s, m in q.spans for o in SELECTORS[selection](m, share)]
        return prefill_flops(args, sorted(text + chosen))
    reused = [p for s, m in q.spans for p in range(s, s + m)]
    k = round(share * len(reused))
    spread = reused[::max(1, len(reused) // max(k, 1))][:k]  # its choices fall all over the chunks
    return prefill_flops(args, reused, layers=2) + prefill_flops(args, sorted(text + spread))


# ------------------------------------------------------------------------------ one question

class Question:
    def __init__(self, item: dict, tok, docs: int) -> None:
        enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
        self.prefix = enc(PREFIX)
        self.chunks = [enc("Passage: " + c["text"] + "\n") for c in item["ctxs"][:docs]]
        self.question = enc(QUESTION.format(q=item["question"]))
        self.answers = list(item.get("answers") or [])
        self.tokens, self.spans = self.assemble(range(len(self.chunks)))

    def assemble(self, order, question: list[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt with the passages in `order`, and their spans."""
        tokens, spans = list(self.prefix), []
        for i in order:
            spans.append((len(tokens), len(self.chunks[i])))
            tokens += self.chunks[i]
        return tokens + (self.question if question is None else question), spans


# ------------------------------------------------------------------------------ engine runs

def _params(n: int):
    from kvweave.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=n > 1)


def serve(engine, tokens: list[int], namespace: str, spans=(), max_tokens: int = 1, prompt_logits: int = 0,
          reset: bool = True) -> tuple[float, object]:
    """One request alone through the engine: (seconds to its first token, its final output). The
    device prefix cache is emptied first (unless `reset` is false), and KV jobs left in flight
    (write-through saves, chunk-caches being stored) are finished before returning."""
    if reset:
        engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    req = engine.make_request(tokens, _params(max_tokens), cache_namespace=namespace, chunk_spans=spans,
                              prompt_logits=prompt_logits)
    engine.submit(req)
    first, final = None, None
    while engine.has_unfinished():
        for out in engine.step():
            if out.req_id == req.req_id:
                first = first or time.perf_counter() - t0
                final = out if out.finished else final
    return first, final


def build_standalone(engine, q: Question, namespace: str) -> float:
    """Seconds the engine spends making the passages' standalone chunk-caches: it serves a first
    prompt with them (not counted), then computes each passage after the instruction with its own
    engine-made requests (counted, until they are stored). The first prompt has the passages in
    another order and another question, so that its prefix blocks (written through to DRAM) are not
    the measured prompt's."""
    engine.block_manager.reset_prefix_cache()
    order = list(range(1, len(q.chunks))) + [0]
    tokens, spans = q.assemble(order, q.question[:4])
    req = engine.make_request(tokens, _params(1), cache_namespace=namespace, chunk_spans=spans)
    engine.submit(req)
    done = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.req_id == req.req_id and out.finished:
                done = time.perf_counter()
    return time.perf_counter() - done


def build_in_context(engine, q: Question, namespace: str, seed: int) -> None:
    """The passages' in-context caches: kept by an `in_context` engine from a prompt that had them in
    another order (and another question)."""
    order = list(range(len(q.chunks)))
    random.Random(seed).shuffle(order)
    if order[0] == 0:  # another first passage: the measured prompt must not find it as a prefix
        order = order[1:] + order[:1]
    tokens, spans = q.assemble(order, q.question[:4])
    serve(engine, tokens, namespace, spans)


def copy_chunks(src, dst, q: Question, namespace: str) -> None:
    """Hand the passages' chunk-caches from one engine's store to another's (as a peer transfer)."""
    from kvstore.chunks import load_chunk, store_chunk
    from kvstore.keys import chunk_hash, encode_extra_keys

    extra = encode_extra_keys((src.model_name, namespace))
    bs = src.config.block_size
    for c in q.chunks:
        key = chunk_hash(c, extra)
        kv = load_chunk(src.store, key, len(c), bs)
        if kv is None or not store_chunk(dst.store, key, kv, bs, cost=float(len(c))):
            raise RuntimeError("a chunk-cache is missing or does not fit in the DRAM tier")


def make_engines(cfg: RagConfig) -> dict[str, object]:
    """One engine per distinct arm configuration (full prefill and prefix caching use kvweave's)."""
    from worker.engine import EngineConfig, LLMEngine

    engines: dict[tuple, object] = {}
    by_arm = {}
    for arm in ARMS:
        overrides = dict(arm.config)
        if cfg.ratio is not None:
            overrides.setdefault("chunk_recompute_ratio", cfg.ratio)
        key = tuple(sorted(overrides.items()))
        if key not in engines:
            engines[key] = LLMEngine(EngineConfig(model=cfg.model, dtype=cfg.dtype, kv_cache_gb=cfg.kv_cache_gb,
                                                  num_threads=cfg.threads, max_num_batched_tokens=16384,
                                                  dram_cache_gb=cfg.dram_cache_gb, **overrides))
        by_arm[arm.name] = engines[key]
    return by_arm


def _answer_text(engine, ids: list[int]) -> str:
    stop = set(engine.tokenizer.eos_token_ids) | set(engine.args.eos_token_ids)
    return engine.tokenizer.decode([t for t in ids if t not in stop]).split("\n")[0]


def run_question(engines: dict, q: Question, qi: int, sums: dict, f1: dict, build: list[float]) -> None:
    """Every arm on one question, into `sums` (TTFT, fidelity, FLOPs, recomputed share)."""
    main = engines["kvweave"]
    ns = f"q{qi}"
    # Full prefill: TTFT, the greedy answer (the teacher) and its logits.
    t, out = serve(main, q.tokens, f"full-{ns}", max_tokens=ANSWER_TOKENS)
    sums["full"]["ttft"] += t
    sums["full"]["flops"] += prefill_flops(main.args, range(len(q.tokens)))
    answer = list(out.token_ids)
    f1["full"] += token_f1(_answer_text(main, answer), q.answers)
    forced = q.tokens + answer[:-1]
    _, out = serve(main, forced, f"full-{ns}", prompt_logits=len(answer))
    full_logits = out.prompt_logits
    serve(main, q.prefix + q.chunks[0][:1], f"prefix-{ns}")
    t, out = serve(main, q.tokens, f"prefix-{ns}", reset=False)
    sums["prefix_caching"]["ttft"] += t
    sums["prefix_caching"]["flops"] += prefill_flops(main.args, range(out.num_cached_tokens, len(q.tokens)))
    # The chunk-caches: standalone ones made by kvweave's engine, in-context ones by an in_context engine.
    build.append(build_standalone(main, q, ns))
    in_context_src = engines["kvweave_in_context"]
    build_in_context(in_context_src, q, ns, qi)
    for arm in ARMS:
        if arm.caches == "none":
            continue
        engine = engines[arm.name]
        src = main if arm.caches == "standalone" else in_context_src
        if engine is not src:
            copy_chunks(src, engine, q, ns)
        serve(engine, q.prefix + q.chunks[0] + q.question[:1], ns)  # the same cached prefix in every arm
        t, out = serve(engine, q.tokens, ns, q.spans)
        share = dict(arm.config).get("chunk_recompute_ratio", engine.config.chunk_recompute_ratio)
        sums[arm.name]["flops"] += arm_flops(arm, main.args, q, share, out.num_cached_tokens)
        _, out = serve(engine, forced, ns, q.spans, prompt_logits=len(answer))
        agree, kl = kl_and_agreement(full_logits, out.prompt_logits)
        s = sums[arm.name]
        s["ttft"] += t
        s["agree"] += agree
        s["kl"] += kl
        s["recomputed"] += out.num_recomputed_tokens / max(out.num_chunk_reused_tokens, 1)
    _, out = serve(main, q.tokens, ns, q.spans, max_tokens=ANSWER_TOKENS)
    f1["kvweave"] += token_f1(_answer_text(main, list(out.token_ids)), q.answers)
    sums["full"]["agree"] += 1.0
    sums["prefix_caching"]["agree"] += 1.0  # the same computation as full prefill


def answers_only(engines: dict, q: Question, qi: int, f1: dict) -> None:
    main = engines["kvweave"]
    _, out = serve(main, q.tokens, f"full-q{qi}", max_tokens=ANSWER_TOKENS)
    f1["full"] += token_f1(_answer_text(main, list(out.token_ids)), q.answers)
    build_standalone(main, q, f"q{qi}")
    _, out = serve(main, q.tokens, f"q{qi}", q.spans, max_tokens=ANSWER_TOKENS)
    f1["kvweave"] += token_f1(_answer_text(main, list(out.token_ids)), q.answers)


def run_benchmark(cfg: RagConfig) -> tuple[dict, list[Result]]:
    torch.set_flush_denormal(True)
    with open(cfg.dataset) as f:
        all_items = json.load(f)
    lo = cfg.question_offset
    items = all_items[lo:lo + cfg.questions]
    if not items:
        raise ValueError(f"the dataset has no question at offset {lo}")
    engines = make_engines(cfg)
    main = engines["kvweave"]
    ratio = main.config.chunk_recompute_ratio
    tok = main.tokenizer
    sums = {m: {"agree": 0.0, "kl": 0.0, "flops": 0.0, "ttft": 0.0, "recomputed": 0.0} for m in METHODS}
    f1 = {"full": 0.0, "kvweave": 0.0}
    build: list[float] = []
    n_tokens = 0
    warm = Question(items[0], tok, cfg.docs)  # first-call costs (allocations, kernels) are not timed
    for engine in set(engines.values()):
        serve(engine, warm.tokens[:256], "warmup")
    for qi, item in enumerate(items, start=lo):
        q = Question(item, tok, cfg.docs)
        n_tokens += len(q.tokens)
        run_question(engines, q, qi, sums, f1, build)
        print(f"question {qi + 1 - lo}/{len(items)} (#{qi}): {len(q.tokens)} tokens, kvweave TTFT "
              f"{sums['kvweave']['ttft'] * 1000 / (qi + 1 - lo):.0f} ms vs full "
              f"{sums['full']['ttft'] * 1000 / (qi + 1 - lo):.0f} ms (running means)", file=sys.stderr, flush=True)
    n_f1 = max(cfg.f1_questions, len(items))
    for qi in range(lo + len(items), lo + n_f1):  # more answers for F1 only
        answers_only(engines, Question(all_items[qi], tok, cfg.docs), qi, f1)
        print(f"answer F1 question {qi + 1 - lo}/{n_f1}", file=sys.stderr, flush=True)
    for engine in set(engines.values()):
        engine.close()
    return _report(cfg, sums, f1, build, len(items), n_f1, n_tokens, ratio, main)


def _report(cfg: RagConfig, sums: dict, f1: dict, build: list[float], k: int, n_f1: int, n_tokens: int,
            ratio: float, main) -> tuple[dict, list[Result]]:
    avg = {m: {key: v / k for key, v in d.items()} for m, d in sums.items()}
    kv, full, pc, cb = avg["kvweave"], avg["full"], avg["prefix_caching"], avg["cacheblend_same_share"]
    build_s = sum(build) / len(build)
    by_method = {m: {"agreement": round(avg[m]["agree"], 4), "kl": round(avg[m]["kl"], 5),
                     "prefill_gflops": round(avg[m]["flops"] / 1e9, 6), "ttft_ms": round(avg[m]["ttft"] * 1000, 1),
                     "ttft_ratio_vs_full": round(full["ttft"] / avg[m]["ttft"], 2) if avg[m]["ttft"] else None,
                     "recomputed_share": round(avg[m]["recomputed"], 4)}
                 for m in METHODS}
    amortised = kv["ttft"] + build_s / cfg.reuses
    results = [
        Result("ttft_vs_full_prefill", kv["ttft"] * 1000, "ms", "full prefill", full["ttft"] * 1000,
               higher_is_better=False, extra={"target": ">= 4"}),
        Result("ttft_with_cache_build", amortised * 1000, "ms", "full prefill", full["ttft"] * 1000,
               higher_is_better=False,
               extra={"standalone_cache_build_ms": round(build_s * 1000, 1), "reuses": cfg.reuses,
                      "note": "kvweave's TTFT plus the time to compute the passages' standalone caches / reuses"}),
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
        Result("kl_vs_cacheblend", kv["kl"], "nats", "CacheBlend (deviation selection, same share)", cb["kl"],
               higher_is_better=False,
               extra={"target": ">= 1.5", "cacheblend_15pct_kl": round(avg["cacheblend"]["kl"], 5),
                      "cacheblend_15pct_ttft_ratio": by_method["cacheblend"]["ttft_ratio_vs_full"]}),
        Result("answer_f1", f1["kvweave"] / n_f1 * 100, "points", "full prefill", f1["full"] / n_f1 * 100,
               extra={"difference": round((f1["kvweave"] - f1["full"]) / n_f1 * 100, 2), "questions": n_f1,
                      "target": "within 1 point"}),
    ]
    lo = cfg.question_offset
    held_out = lo >= TUNED_ON[1] or lo + k <= TUNED_ON[0]
    config = {"model": cfg.model, "dtype": str(main.model.dtype).removeprefix("torch."),
              "dataset": os.path.relpath(cfg.dataset), "questions": k, "question_offset": lo,
              "questions_held_out": held_out, "defaults_tuned_on": f"questions {TUNED_ON[0]}-{TUNED_ON[1] - 1}",
              "docs": cfg.docs, "recompute_ratio": ratio, "correction": main.config.chunk_correction,
              "mean_prompt_tokens": round(n_tokens / k), "answer_tokens": ANSWER_TOKENS, "threads": cfg.threads,
              "caches": "standalone after the instruction, made by the engine"}
    return config, results


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("rag", help="chunk-cache reuse on MuSiQue through the serving engine: TTFT, prefill FLOPs "
                                    "and fidelity to full prefill against prefix caching, naive reuse, CacheBlend "
                                    "and chunk-start selection")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="MuSiQue-format JSON (ctxs, question, answers)")
    p.add_argument("--questions", type=int, default=RagConfig.questions, help="questions to run")
    p.add_argument("--question-offset", type=int, default=RagConfig.question_offset,
                   help=f"first question (default {TUNED_ON[1]}: the defaults were tuned on questions "
                        f"{TUNED_ON[0]}-{TUNED_ON[1] - 1})")
    p.add_argument("--f1-questions", type=int, default=0,
                   help="answer F1 over this many questions (the ones past --questions run only the answers)")
    p.add_argument("--docs", type=int, default=RagConfig.docs, help="passages per prompt (K)")
    p.add_argument("--reuses", type=int, default=RagConfig.reuses,
                   help="reuses over which building a standalone chunk-cache is amortised")
    p.add_argument("--ratio", type=float, default=None, help="kvweave's recompute share (default: the engine's)")
    p.add_argument("--model", default=RagConfig.model, help="model (default: smollm2-135m)")
    p.add_argument("--dtype", default=RagConfig.dtype, help="auto | bfloat16 | float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.dataset):
        print(f"error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    if args.questions < 1 or args.docs < 1 or args.reuses < 1 or args.question_offset < 0:
        print("error: --questions, --docs and --reuses must be positive, --question-offset >= 0", file=sys.stderr)
        return 2
    if args.ratio is not None and not 0.0 <= args.ratio <= 1.0:
        print("error: --ratio must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        with open(args.dataset) as f:
            data = json.load(f)
        needed = args.question_offset + max(args.questions, args.f1_questions)
        if not isinstance(data, list) or not all(isinstance(x, dict) and "ctxs" in x and "question" in x
                                                 for x in data[args.question_offset:needed]):
            raise ValueError("expected a list of objects with ctxs and question")
        if len(data) < needed:
            raise ValueError(f"it has {len(data)} questions; {needed} are needed")
    except (OSError, ValueError) as e:
        print(f"error: dataset {args.dataset} is not a MuSiQue-format JSON list: {e}", file=sys.stderr)
        return 2
    cfg = RagConfig(model=args.model, dtype=args.dtype, dataset=args.dataset, questions=args.questions,
                    question_offset=args.question_offset, docs=args.docs, f1_questions=args.f1_questions,
                    reuses=args.reuses, ratio=args.ratio)
    config, results = run_benchmark(cfg)
    print(render("rag", config, results))
    for m, d in results[4].extra["by_method"].items():
        print(f"  {m:<22} " + "  ".join(f"{k}={v}" for k, v in d.items()))
    if args.json:
        write_json(args.json, "rag", config, results)
    return 0
