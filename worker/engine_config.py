"""The engine's settings (`EngineConfig`, checked when built) and how the device and dtype they
name are resolved; worker/engine.py builds the engine from them (and re-exports them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.manager import StoreConfig
from kvstore.tier import TierConfigError
from kvweave.cpu_affinity import parse_cores
from kvweave.defaults import BLOCK_SIZE, CHUNK_RECOMPUTE_RATIO, DEFAULT_MODEL, MAX_CHUNKS_PER_REQUEST
from worker.chunk_blend import CHUNK_CACHE_MODES, CHUNK_SELECTIONS
from worker.config import ConfigError, StoreConfigError
from worker.kv_handoff import DEFAULT_HANDOFF_TTL_S
from worker.loader import LOAD_FORMATS
from worker.scheduler import check_long_prefill

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TP_ALLREDUCES = ("auto", "shm", "gloo")
TP_OVERLAP_MIN_TOKENS = {"shm": None, "gloo": 512, "nccl": 1024}
"""The smallest tensor-parallel step run token-split by default, per all-reduce (None: never).
Measured with `kvweave bench tp` (2 ranks, AMD EPYC, docs/benchmarks/tp-2026-12-06*.json): with
the shared-memory all-reduce the split is within noise (0.97-1.04x: its all-reduces are 1-2% of a
step); over gloo it loses at 64-256 tokens (0.87-0.98x) and pays from 512 (1.08-1.20x). NCCL's is
TokenWeave's figure, unmeasured here."""


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    """Built-in model name, Hugging Face checkpoint folder or .gguf file."""
    dtype: str = "auto"
    """auto | bfloat16 | float16 | float32 (auto: bf16 where the device has bf16 support)."""
    device: str = "auto"
    """Torch device of the model and the KV cache: auto (cuda when present, else cpu), cpu, cuda, cuda:N."""
    load_format: str = "auto"
    """auto: the checkpoint's weights; dummy: random weights of its shapes made on the device (only
    config.json and the tokenizer are read), for speed measurements of models not at hand."""
    block_size: int = BLOCK_SIZE
    kv_cache_gb: float = 1.0
    """Memory for the paged KV cache."""
    num_blocks: int | None = None
    """Exact number of KV blocks (overrides kv_cache_gb)."""
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    """Token budget of one step, decodes and prefill chunks together (vLLM's CPU server default).
    Served through the router, 8 RAG requests of ~2.5k-token prompts finished 1.26x faster than
    with 512 (fewer, larger chunks: matrix products and attention run at higher rates), 32 random
    ones 1.06x; a running decode waits longer behind a full chunk (lower it for tighter ITL)."""
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    """A prompt with more tokens than this left to compute is long: it gets at most this many tokens
    a step, and short prompts behind it in the queue are admitted while it waits (worker/scheduler.py;
    vLLM's flag of that name). 0: off, prompts are admitted first come, first served."""
    max_long_partial_prefills: int = 1
    """Long prompts (see long_prefill_token_threshold) that get a prefill chunk in one step."""
    long_prefill_chunk_tokens: int = 0
    """With long_prefill_token_threshold: at most this many tokens of a long prompt a step (0: the
    threshold). Smaller chunks shorten the steps that a short prompt arriving behind long ones
    waits for (each step also streams all the weights, so long prompts take more steps and longer)."""
    prioritize_short_prefills: bool = False
    """With long_prefill_token_threshold T: a step's short prompts are scheduled before its long
    ones, and a long prompt's chunk takes only what their prefill tokens leave of T (at least one
    token), so the step that prefills a short prompt is about as long as the short prompt alone."""
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    """Context length; defaults to the model's."""
    num_threads: int | None = None
    """torch intra-op threads (default: torch's choice; one per core of `cpu_cores` when given)."""
    cpu_cores: str | None = None
    """CPU cores the engine's process runs on, e.g. "0-3" or "0,2" (kvweave/cpu_affinity.py; default:
    wherever the scheduler puts it). `kvweave serve` gives each local worker its own cores."""
    attention_cost_len: int | None = None
    """Context length at which a prefill token's attention costs as much as the rest of its forward,
    used to shorten deep prefill chunks (None: derived from the model; 0: count tokens only)."""
    dram_cache_gb: float | None = None
    """Host-memory KV tier behind the device cache, GiB (None: none)."""
    ssd_cache_gb: float | None = None
    """SSD KV tier, GiB (None: none; needs ssd_cache_dir)."""
    ssd_cache_dir: str | None = None
    """Directory of the SSD tier's slab file (kept across restarts)."""
    kv_eviction_policy: str = "lru"
    """Eviction policy of the host tiers: lru | cost_aware."""
    max_chunks_per_request: int = MAX_CHUNKS_PER_REQUEST
    """Most reusable chunks one request may carry."""
    chunk_recompute_ratio: float = CHUNK_RECOMPUTE_RATIO
    """Share of each reused chunk's tokens recomputed in the new context (its first tokens and an
    evenly spaced sample)."""
    chunk_correction: bool = True
    """Correct the rest of each reused chunk by the mean deviation of its recomputed sample
    (standalone chunk-caches)."""
    chunk_cache_mode: str = "standalone"
    """How first-seen chunks get their cache: standalone | in_context (worker.chunk_blend)."""
    chunk_selection: str = "kvweave"
    """Which tokens of a reused chunk are recomputed: kvweave | chunk_start | deviation (CacheBlend)."""
    handoff_ttl_s: float = DEFAULT_HANDOFF_TTL_S
    """How long a prefill worker holds a handed-off prompt's KV for a decode worker that does not
    release it (worker/kv_handoff.py)."""
    tensor_parallel_size: int = 1
    """Ranks (processes) the model is split over (worker/tp_executor.py): they must divide its query
    heads and MLP columns, and divide or be a multiple of its KV heads (docs/tensor-parallel.md)."""
    tp_overlap: bool = True
    """Under tensor parallelism, run steps of at least `tp_overlap_min_tokens` tokens in two halves
    whose all-reduces overlap the other half's compute (worker/token_split.py)."""
    tp_overlap_min_tokens: int | None = None
    """The smallest step split in two (None: the measured default of the ranks' all-reduce,
    TP_OVERLAP_MIN_TOKENS; `kvweave bench tp` measures where the split starts to pay)."""
    tp_allreduce: str = "auto"
    """How the CPU ranks all-reduce: shm (through shared memory, worker/shm_all_reduce.py: x86 only),
    gloo, or auto (shm where it can run). GPU ranks use NCCL."""

    def __post_init__(self) -> None:
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise ConfigError(f"unknown device {self.device!r}: {e}") from e
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"unknown load_format {self.load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
        if self.block_size <= 0 or self.kv_cache_gb <= 0:
            raise ConfigError("block_size and kv_cache_gb must be positive")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.chunk_cache_mode not in CHUNK_CACHE_MODES:
            raise ConfigError(f"unknown chunk_cache_mode {self.chunk_cache_mode!r}; valid: "
                              f"{', '.join(CHUNK_CACHE_MODES)}")
        if self.chunk_selection not in CHUNK_SELECTIONS:
            raise ConfigError(f"unknown chunk_selection {self.chunk_selection!r}; valid: "
                              f"{', '.join(CHUNK_SELECTIONS)}")
        if not 0.0 <= self.chunk_recompute_ratio <= 1.0:
            raise ConfigError(f"chunk_recompute_ratio must be in [0, 1], got {self.chunk_recompute_ratio}")
        if self.max_chunks_per_request < 1:
            raise ConfigError(f"max_chunks_per_request must be positive, got {self.max_chunks_per_request}")
        if not self.handoff_ttl_s > 0:
            raise ConfigError(f"handoff_ttl_s must be positive, got {self.handoff_ttl_s}")
        check_long_prefill(self.long_prefill_token_threshold, self.max_long_partial_prefills,
                           self.long_prefill_chunk_tokens, self.prioritize_short_prefills)
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.cpu_cores is not None:
            try:
                parse_cores(self.cpu_cores)
            except ValueError as e:
                raise ConfigError(f"cpu_cores: {e}") from e
            if self.tensor_parallel_size > 1:
                raise ConfigError("cpu_cores with tensor parallelism is not built: the ranks would share the cores")
        if self.tp_allreduce not in TP_ALLREDUCES:
            raise ConfigError(f"unknown tp_allreduce {self.tp_allreduce!r}; valid: {', '.join(TP_ALLREDUCES)}")
        if self.tp_overlap_min_tokens is not None and self.tp_overlap_min_tokens < 2:
            raise ConfigError(f"tp_overlap_min_tokens must be >= 2, got {self.tp_overlap_min_tokens}")
        try:
            self.store_config = StoreConfig(self.dram_cache_gb, self.ssd_cache_gb, self.ssd_cache_dir,
                                            self.kv_eviction_policy)
        except TierConfigError as e:
            raise StoreConfigError(str(e)) from e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device = torch.device("cpu")) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
