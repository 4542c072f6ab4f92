"""`kvweave bench tp`: tensor parallelism's token-split overlap (worker/token_split.py) against the
same group running its layers in one piece, on prefill chunks of 512-4096 tokens.

For each all-reduce (`--allreduce`: gloo over loopback, and the shared-memory one of
worker/shm_all_reduce.py), two engines with the same `--tp` ranks (one thread each) serve the same
model, one with the overlap on every step and one without; each chunk size is timed on all engines
in turn (one engine step, the prompt's whole prefill, prefix caching off; the median of
`--repeats`). The time of the all-reduces alone is measured on each group too: a step has two per
layer, of [tokens, hidden] each.

Results (BENCHMARKS.md's format), per all-reduce and chunk size:
- `step_ms/<allreduce>/<tokens>`: the overlapped step against the sequential one (ratio: the speedup);
- `allreduce_hidden_share/<allreduce>/<tokens>`: the step time the overlap saved, against the
  all-reduces' own time (ratio: the share of that time hidden; target >= 0.5);
- `shm_allreduce_step/<tokens>` (both measured): the sequential step with the shared-memory
  all-reduce against gloo's.

The model: random weights (`--load-format dummy`) of the default model's shape but with 8 query and
2 KV heads of 64 (SmolLM2-135M's 9 and 3 do not split over 2 ranks), or `--model` (a Hugging Face
folder; its weights are used). On 2 shared cores the gain is bounded by the all-reduces' share of
a step; multi-GPU figures (TokenWeave's 1.2x) cannot be measured on this project's machines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import Result, render, write_json

SHAPE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 576,
         "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 2,
         "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
         "torch_dtype": "bfloat16"}
"""SmolLM2-135M's layers with 8 query and 2 KV heads of 64."""
CHUNKS = (512, 1024, 2048, 4096)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_folder(folder: Path) -> Path:
    """A Hugging Face folder with SHAPE's config and the default model's tokenizer (weights: dummy)."""
    from kvweave.model_files import load_tokenizer, write_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SHAPE, indent=1))
    default = load_tokenizer("smollm2-135m")
    write_tokenizer_files(default.tokenizer, default.max_seq_len, folder)
    return folder


def _engine(model: str, tp: int, allreduce: str, overlap: bool, max_tokens: int, dummy: bool):
    from worker.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=model, dtype="bfloat16", tensor_parallel_size=tp, num_threads=1,
                                  load_format="dummy" if dummy else "auto", enable_prefix_caching=False,
                                  max_num_batched_tokens=max_tokens, num_blocks=max_tokens // 16 + 64, attention_cost_len=0,
                                  tp_overlap=overlap, tp_overlap_min_tokens=2, tp_allreduce=allreduce))


def _prefill_step_s(engine, tokens: int, seed: int) -> float:
    """Seconds of the one step that prefills a fresh prompt of `tokens` tokens."""
    import torch

    from kvweave.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, engine.args.vocab_size, (tokens,), generator=gen).tolist()
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    t = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - t
    while engine.has_unfinished():
        engine.step()
    return seconds


def run_benchmark(model: str, dummy: bool, tp: int, chunks: list[int], repeats: int, allreduces: list[str]
                  ) -> tuple[dict, list[Result]]:
    import torch

    engines = {}
    try:
        for impl in allreduces:
            for overlap in (True, False):
                engines[impl, overlap] = _engine(model, tp, impl, overlap, max(chunks), dummy)
        args = next(iter(engines.values())).args
        for e in engines.values():  # warm-up: first-use allocations and the kernels' first calls
            _prefill_step_s(e, min(chunks), seed=0)
        results = []
        for tokens in chunks:
            times = {key: [] for key in engines}
            for r in range(repeats):
                for key, engine in engines.items():  # in turn, so drift hits all alike
                    times[key].append(_prefill_step_s(engine, tokens, seed=1000 * tokens + r))
            sequential = {}
            for impl in allreduces:
                seq, ovl = statistics.median(times[impl, False]), statistics.median(times[impl, True])
                sequential[impl] = seq
                one = engines[impl, False].tp.time_all_reduce((tokens, args.dim), torch.bfloat16, iters=5)
                allreduce = 2 * args.n_layers * one
                _log(f"{impl}, {tokens} tokens: sequential {seq * 1e3:.1f} ms, overlapped {ovl * 1e3:.1f} ms, "
                     f"all-reduces alone {allreduce * 1e3:.1f} ms")
                results.append(Result(f"step_ms/{impl}/{tokens}", ovl * 1e3, "ms",
                                      "the same TP group without the overlap", seq * 1e3, higher_is_better=False,
                                      extra={"overlapped_ms": [round(t * 1e3, 2) for t in times[impl, True]],
                                             "sequential_ms": [round(t * 1e3, 2) for t in times[impl, False]]}))
                results.append(Result(f"allreduce_hidden_share/{impl}/{tokens}", (seq - ovl) * 1e3, "ms",
                                      "the step's all-reduces alone", allreduce * 1e3,
                                      extra={"target_ratio": 0.5, "one_allreduce_ms": round(one * 1e3, 3),
                                             "allreduce_share_of_step": round(allreduce / seq, 3)}))
            if {"shm", "gloo"} <= sequential.keys():
                results.append(Result(f"shm_allreduce_step/{tokens}", sequential["shm"] * 1e3, "ms",
                                      "the same step with gloo's all-reduce", sequential["gloo"] * 1e3,
                                      higher_is_better=False))
    finally:
        for e in engines.values():
            e.close()
    config = {"model": model if not dummy else "random weights: " + json.dumps({k: SHAPE[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim")}), "tensor_parallel_size": tp, "threads_per_rank": 1, "chunks": chunks, "repeats": repeats,
        "dtype": "bfloat16", "allreduce": allreduces}
    return config, results


def add_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("tp", help="tensor parallelism: the token-split overlap against the same group without it")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--model", help="a Hugging Face folder (default: random weights of the default model's layers "
                                   "with 8 query and 2 KV heads)")
    p.add_argument("--tp", type=int, default=2, help="ranks (default: 2, one thread each)")
    p.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="prefill chunk sizes in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--allreduce", default="shm,gloo", help="all-reduces to measure: shm (shared memory), gloo")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    except ValueError:
        chunks = []
    allreduces = [a.strip() for a in args.allreduce.split(",") if a.strip()]
    if not chunks or min(chunks) < 2 or args.repeats < 1 or args.tp < 2:
        _log("error: --chunks must be sizes >= 2 tokens, --repeats >= 1 and --tp >= 2")
        return 2
    if not allreduces or not set(allreduces) <= {"shm", "gloo"}:
        _log(f"error: --allreduce {args.allreduce!r}: name shm, gloo or both")
        return 2
    if args.model is not None and not (Path(args.model) / "config.json").exists():
        _log(f"error: --model {args.model}: not a Hugging Face folder (no config.json)")
        return 2
    with tempfile.TemporaryDirectory(prefix="kvweave-bench-tp-") as tmp:
        model = args.model or str(model_folder(Path(tmp) / "model"))
        try:
            config, results = run_benchmark(model, args.model is None, args.tp, chunks, args.repeats, allreduces)
        except ValueError as e:  # a model that does not split over --tp ranks
            _log(f"error: {e}")
            return 2
    print(render("tp", config, results))
    if args.json:
        write_json(args.json, "tp", config, results)
    return 0
