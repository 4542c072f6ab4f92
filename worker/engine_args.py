"""The one mapping of CLI flags and KVWEAVE_* environment variables onto EngineConfig."""
from __future__ import annotations

import argparse
import dataclasses
import os

from worker.engine import EngineConfig

HELP = {
    "model": "built-in model name (smollm2-135m), Hugging Face checkpoint folder, or .gguf file",
    "dtype": "auto | bfloat16 | float16 | float32 (auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32)",
    "device": "torch device of the model and KV cache: auto (cuda when present, else cpu) | cpu | cuda | cuda:N",
    "block_size": "tokens per KV block",
    "kv_cache_gb": "memory for the paged KV cache, GiB",
    "num_blocks": "exact number of KV blocks (overrides --kv-cache-gb)",
    "max_num_seqs": "cap on running requests",
    "max_num_batched_tokens": "token budget of one engine step (decodes + prefill chunks)",
    "enable_chunked_prefill": "split long prompts across steps (stall-free batching)",
    "enable_prefix_caching": "reuse the KV of cached prompt prefixes",
    "max_model_len": "context length (default: the model's)",
    "num_threads": "torch CPU threads (default: all cores)",
    "attention_cost_len": "context length at which a prefill token's attention costs as much as the rest of "
                          "its forward; deep prefill chunks are shortened by it (default: from the model; 0: off)",
    "dram_cache_gb": "host-memory KV tier behind the device cache, GiB (default: none)",
    "ssd_cache_gb": "SSD KV tier, GiB; needs --ssd-cache-dir (default: none)",
    "ssd_cache_dir": "directory of the SSD tier's slab file, kept across restarts",
    "kv_eviction_policy": "eviction policy of the host KV tiers: lru | cost_aware",
    "max_chunks_per_request": "most reusable chunks (documents) one request may carry",
    "chunk_recompute_ratio": "share of each reused chunk-cache's tokens recomputed in the new context",
    "chunk_correction": "correct the rest of each reused chunk by the mean deviation of its recomputed tokens "
                        "(standalone chunk-caches)",
    "chunk_selection": "which tokens of a reused chunk are recomputed: kvweave (chunk starts + an even sample, "
                       "with the dense correction) | chunk_start | deviation (CacheBlend's layer-1 value deviation)",
    "chunk_cache_mode": "how a first-seen chunk gets its cache: standalone (computed alone after the prompt's "
                        "leading text: one extra prefill, best reuse quality) | in_context (its KV in the prompt "
                        "it came in: free)",
}
TYPES = {"dram_cache_gb": float, "ssd_cache_gb": float, "ssd_cache_dir": str}
"""Types of the optional fields that are not counts."""


def _env(name: str) -> str | None:
    return os.environ.get("KVWEAVE_" + name.upper())


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per EngineConfig field; KVWEAVE_<FIELD> environment variables set defaults."""
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = TYPES.get(f.name) or (type(default) if default is not None else int)
        env = _env(f.name)
        if kind is bool:
            value = parse_bool(env) if env is not None else default
            group.add_argument(flag, type=parse_bool, default=value, metavar="BOOL",
                               help=f"{HELP[f.name]} (default: {value})")
        else:
            value = kind(env) if env is not None else default
            group.add_argument(flag, type=kind, default=value, help=f"{HELP[f.name]} (default: {value})")


def engine_config_from_args(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineConfig)})
