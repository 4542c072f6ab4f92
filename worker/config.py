"""Model configuration shared by the loaders, the model code and the engine.

`ModelArgs.from_hf_config` reads every form of `config.json` that transformers writes for the
supported model types (llama, mistral, qwen2): the 5.x form, where RoPE lives in
`rope_parameters` (`rope_theta`, `rope_type` and the scaling fields together), and the 4.x form
(`rope_theta` at the top level, scaling in `rope_scaling`). A field that changes the forward and
that the model code does not implement is refused with a `ConfigError` naming it, never ignored.
Fields that do not change the forward (ids, architectures, transformers_version, use_cache,
initializer_range, dropout, ...) are ignored, as transformers ignores them at inference.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"),
}
"""Supported RoPE types -> the scaling fields each one reads (see `worker.model.rope_inv_freq`)."""
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor",), "yarn": ("factor", "original_max_position_embeddings")}
_ROPE_REFUSED = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length, which a KV cache "
               "written at shorter lengths cannot follow",
}
_SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "auto")
_LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
    """A model or engine configuration value is invalid."""


class StoreConfigError(ConfigError):
    """The KV store's tiers cannot be built as configured (capacity, cache directory)."""


@dataclass
class ModelArgs:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral)."""

    dim: int
    """Hidden size."""
    n_layers: int
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention when < n_heads)."""
    vocab_size: int
    hidden_dim: int
    """Feed-forward (SwiGLU) inner size."""
    head_dim: int = 0
    """Per-head size; 0 means dim // n_heads."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """RoPE scaling in Hugging Face's form: `rope_type` (one of `ROPE_TYPES`) and its fields; None is
    plain RoPE. `from_hf_config` fills in the defaults transformers applies."""
    max_seq_len: int = 2048
    """Context length (max_position_embeddings, capped at a sliding window)."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"
    """A short name used in hashes, logs and /v1/models."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        for attr in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.rope_scaling = checked_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model") -> "ModelArgs":
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x form)."""
        check_hf_fields(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        n_heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = hf_rope(cfg)
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=_served_context(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("model_type") == "qwen2",  # Qwen2's q/k/v always carry a bias
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of fp16/bf16 KV per token across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2


def check_hf_fields(cfg: dict) -> None:
    """Refuse the forward-changing fields of a Hugging Face config that the model code does not implement."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu': the SwiGLU MLP)")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias: true is not supported (the MLP projections have no bias)")
    if cfg.get("attention_bias") and cfg.get("model_type") == "llama":
        raise ConfigError("attention_bias: true is not supported for llama (it also gives o_proj a bias, "
                          "which the model code does not implement)")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantization_config ({method}) is not supported: pass an unquantized checkpoint or a GGUF")
    for key in ("dtype", "torch_dtype"):  # transformers 5 and 4 names of the stored weights' dtype
        if cfg.get(key) is not None and cfg[key] not in _SUPPORTED_DTYPES:
            raise ConfigError(f"{key} {cfg[key]!r} is not supported (supported: {', '.join(_SUPPORTED_DTYPES)})")
    unknown = sorted(set(cfg.get("layer_types") or ()) - set(_LAYER_TYPES))
    if unknown:
        raise ConfigError(f"layer_types {unknown} are not supported (supported: {', '.join(_LAYER_TYPES)})")
    _check_partial_rotary(cfg.get("partial_rotary_factor"), "partial_rotary_factor")


def hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) of a Hugging Face config, with the defaults transformers 5 fills in."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if params and scaling:
        raise ConfigError("both rope_parameters and rope_scaling are set; keep one (rope_parameters in transformers 5)")
    key, rope = ("rope_parameters", params) if params else ("rope_scaling", scaling or {})
    if any(isinstance(value, dict) for value in rope.values()):
        raise ConfigError(f"{key}: per-layer-type RoPE parameters are not supported")
    rope = dict(rope)
    theta = float(rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    _check_partial_rotary(rope.pop("partial_rotary_factor", None), f"{key}.partial_rotary_factor")
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if kind in ("llama3", "yarn"):
        # transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings
        top = cfg.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = top or rope.get("original_max_position_embeddings") \
            or cfg.get("max_position_embeddings", 2048)
    if kind == "yarn" and rope.get("factor") is None:
        rope["factor"] = cfg.get("max_position_embeddings", 2048) / rope["original_max_position_embeddings"]
    return theta, checked_rope_scaling({"rope_type": kind, **rope}, key)


def checked_rope_scaling(scaling: dict | None, key: str = "rope_scaling") -> dict | None:
    """`scaling` with `rope_type` set (None for plain RoPE); refuses types and fields not implemented."""
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind in _ROPE_REFUSED:
        raise ConfigError(f"{key}.rope_type {kind!r} is not supported: {_ROPE_REFUSED[kind]}")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{key}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    unknown = sorted(k for k, v in scaling.items() if k not in ROPE_TYPES[kind] and v is not None)
    if unknown:
        raise ConfigError(f"{key}: field {unknown[0]!r} is not understood for rope_type {kind!r} "
                          f"(understood: {', '.join(ROPE_TYPES[kind]) or 'none'})")
    missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if scaling.get(k) is None]
    if missing:
        raise ConfigError(f"{key}: rope_type {kind!r} needs {missing[0]!r}")
    if kind == "default":
        return None
    return {"rope_type": kind, **{k: v for k, v in scaling.items() if v is not None}}


def _check_partial_rotary(value: float | None, key: str) -> None:
    if value is not None and value != 1:
        raise ConfigError(f"{key} {value} is not supported (RoPE on the whole head only)")


def _served_context(cfg: dict) -> int:
    """max_position_embeddings, capped at the sliding window when one applies.

    A token attends to the previous `sliding_window` tokens (itself included); a context no longer
    than the window makes sliding-window and full attention the same thing.
    """
    max_len = cfg.get("max_position_embeddings", 2048)
    window = _sliding_window(cfg)
    if window is not None and window < max_len:
        logger.warning("%s sliding_window %d < max_position_embeddings %d: serving a context of %d tokens "
                       "(sliding-window attention is not implemented)", cfg.get("model_type"), window, max_len,
                       window)
        return window
    return max_len


def _sliding_window(cfg: dict) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    if cfg.get("model_type") == "mistral":
        return window  # every layer
    if cfg.get("model_type") == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None
        layer_types = cfg.get("layer_types")
        if layer_types is None:  # Qwen2Config: layers from max_window_layers on slide
            layer_types = ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
                           for i in range(cfg["num_hidden_layers"])]
        return window if "sliding_attention" in layer_types else None
    raise ConfigError(f"sliding_window is not part of a {cfg.get('model_type')} model and is not supported")
