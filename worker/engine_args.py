"""CLI flags and KVWEAVE_* environment variables of EngineConfig (through kvweave.config_flags, the
mapping every command uses), with help texts written for the command line."""
from __future__ import annotations

import argparse

from kvweave.config_flags import add_config_args, config_kwargs
from worker.engine import EngineConfig

HELP = {
    "model": "built-in model name (smollm2-135m), Hugging Face checkpoint folder, or .gguf file",
    "dtype": "auto | bfloat16 | float16 | float32 (auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32)",
    "device": "torch device of the model and KV cache: auto (cuda when present, else cpu) | cpu | cuda | cuda:N",
    "load_format": "auto: the checkpoint's weights | dummy: random weights of its shapes, made on the device "
                   "(reads only config.json and the tokenizer; for speed measurements)",
    "block_size": "tokens per KV block",
    "kv_cache_gb": "memory for the paged KV cache, GiB",
    "num_blocks": "exact number of KV blocks (overrides --kv-cache-gb)",
    "max_num_seqs": "cap on running requests",
    "max_num_batched_tokens": "token budget of one engine step (decodes + prefill chunks)",
    "enable_chunked_prefill": "split long prompts across steps (stall-free batching)",
    "long_prefill_token_threshold": "a prompt with more tokens than this left to compute gets at most this many "
                                    "a step, and shorter prompts queued behind it go first (0: off)",
    "max_long_partial_prefills": "long prompts (see --long-prefill-token-threshold) that get a chunk in one step",
    "long_prefill_chunk_tokens": "with --long-prefill-token-threshold: most tokens of a long prompt a step "
                                 "(0: the threshold)",
    "prioritize_short_prefills": "with --long-prefill-token-threshold T: a long prompt's chunk takes only what the "
                                 "step's short prompts' prefill leaves of T (at least one token)",
    "enable_prefix_caching": "reuse the KV of cached prompt prefixes",
    "max_model_len": "context length (default: the model's)",
    "num_threads": "torch CPU threads (default: all cores; one per core of --cpu-cores when given)",
    "cpu_cores": "CPU cores the worker process runs on, e.g. 0-3 or 0,2 (default: any; kvweave serve gives each "
                 "local worker its own when they fit)",
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


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per EngineConfig field; KVWEAVE_<FIELD> environment variables set defaults."""
    add_config_args(parser.add_argument_group("engine"), EngineConfig, help=HELP)


def engine_config_from_args(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**config_kwargs(EngineConfig, ns))
