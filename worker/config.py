"""Model configuration shared by the loaders, the model code and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    """Hugging Face `rope_scaling` dict; `rope_type: llama3` is supported."""
    max_seq_len: int = 2048
    """Context length (max_position_embeddings)."""
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
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model") -> "ModelArgs":
        """Build from a Hugging Face `config.json` dict."""
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        n_heads = cfg["num_attention_heads"]
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of fp16/bf16 KV per token across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2
