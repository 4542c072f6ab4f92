"""Checkpoint loading: Hugging Face folders and GGUF files to `ModelArgs`, HF-named tensors and a Tokenizer.

Whatever the source, weights come back under Hugging Face Llama names with HF shapes ([out, in]),
so the model code knows one layout.

GGUF specifics:
- tensors are dequantized in one vectorised pass over all their blocks for Q8_0 and Q4_1 (the
  default model's types; `_BLOCK_DEQUANT`), with `gguf.quants` for the other types, and reshaped to
  the reverse of the GGUF `shape` field (GGUF lists the fastest-varying dimension first);
- llama.cpp's converter permutes the q/k rows of `llama`-architecture models from HF's
  rotate-half RoPE layout to interleaved pairs (`permute(w, n_head)`: reshape to
  [n_head, 2, head_dim/2, in] and swap axes 1 and 2, with n_head = n_kv_heads for k);
  we apply the inverse. `qwen2` files are written unpermuted;
- Llama-3 RoPE scaling is stored as a `rope_freqs` tensor of per-frequency divisors; we recover
  the equivalent HF `rope_scaling` dict from it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.torch import load_file

from kvweave.defaults import DEFAULT_MODEL
from kvweave.model_files import CheckpointError, load_hf_tokenizer, model_name, read_json, resolve_model
from kvweave.gguf_file import GGUFFile
from kvweave.tokenizer import Tokenizer
from kvweave.vision_prompt import VisionSpec
from worker.config import ModelArgs

logger = logging.getLogger(__name__)

SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "idefics3")
"""idefics3 (SmolVLM): its language model (`text_config`, a llama) runs as any Llama; its vision
tower and connector weights go to `LoadedCheckpoint.vision` (worker/vision.py)."""
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2")
_PERMUTED_GGUF_ARCHS = ("llama", "mistral")  # llama.cpp converts Mistral through its Llama path
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_IGNORED = ("rope_freqs.weight",)  # read into ModelArgs.rope_scaling instead
_GGUF_UNMAPPED_ROPE_KEYS = ("attn_factor", "yarn_log_multiplier", "yarn_ext_factor", "yarn_attn_factor",
                            "yarn_beta_fast", "yarn_beta_slow")
_REQUIRED = object()


@dataclass
class LoadedCheckpoint:
    """What the engine needs from a checkpoint: architecture, weights, tokenizer."""

    args: ModelArgs
    weights: dict[str, torch.Tensor]
    """Hugging Face Llama names -> tensors in HF shapes."""
    tokenizer: Tokenizer
    vision: VisionCheckpoint | None = None
    """A vision-language model's vision tower, connector and image prompt format (None: text only)."""


@dataclass
class VisionCheckpoint:
    """The vision half of an Idefics3 / SmolVLM checkpoint."""

    config: dict
    """The whole config.json."""
    spec: VisionSpec
    weights: dict[str, torch.Tensor]
    """`model.vision_model.*` and `model.connector.*` tensors (Hugging Face names)."""
    folder: Path


LOAD_FORMATS = ("auto", "dummy")


def load_checkpoint(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, load_format: str = "auto",
                    device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Load config, weights (cast to `dtype`) and tokenizer of a built-in name, HF folder or GGUF file.
    `load_format="dummy"` reads a Hugging Face folder's config and tokenizer only and makes random
    weights of the checkpoint's shapes on `device` (vLLM's dummy format: speed measurements of a
    model whose weights are not at hand)."""
    start = time.perf_counter()
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"unknown load_format {load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
    path = resolve_model(name_or_path)
    name = model_name(name_or_path, path)
    if load_format == "dummy":
        if path.is_file():
            raise CheckpointError(f"{path}: load_format dummy reads a Hugging Face folder's config.json, not a file")
        ckpt = _load_hf_folder(path, name, with_weights=False)
        ckpt.weights = dummy_weights(ckpt.args, dtype, torch.device(device))
    else:
        ckpt = _load_gguf(path, name) if path.is_file() else _load_hf_folder(path, name)
    ckpt.weights = {key: value.to(dtype) for key, value in _checked_weights(ckpt.args, ckpt.weights).items()}
    logger.info(
        "loaded %s from %s: %d layers, dim %d, %d tensors, %s, %.2fs",
        name, path, ckpt.args.n_layers, ckpt.args.dim, len(ckpt.weights), dtype, time.perf_counter() - start,
    )
    return ckpt


def expected_weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `args` must provide, with its HF shape."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, args.dim),
        "model.norm.weight": (args.dim,),
    }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (args.dim,),
            p + "self_attn.q_proj.weight": (q_out, args.dim),
            p + "self_attn.k_proj.weight": (kv_out, args.dim),
            p + "self_attn.v_proj.weight": (kv_out, args.dim),
            p + "self_attn.o_proj.weight": (args.dim, q_out),
            p + "post_attention_layernorm.weight": (args.dim,),
            p + "mlp.gate_proj.weight": (args.hidden_dim, args.dim),
            p + "mlp.up_proj.weight": (args.hidden_dim, args.dim),
            p + "mlp.down_proj.weight": (args.dim, args.hidden_dim),
        }
        if args.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                       p + "self_attn.v_proj.bias": (kv_out,)}
    return shapes


def _checked_weights(args: ModelArgs, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep exactly the expected tensors; fail on missing ones or wrong shapes."""
    expected = expected_weight_shapes(args)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{args.name}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}")
    wrong = [f"{k} {tuple(weights[k].shape)} != {s}" for k, s in expected.items() if tuple(weights[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{args.name}: tensor shapes do not match the config: {'; '.join(wrong[:5])}")
    extra = sorted(set(weights) - set(expected))
    harmless = [k for k in extra if k.endswith("rotary_emb.inv_freq") or k == "lm_head.weight"]  # tied: unused
    if harmless:
        logger.debug("%s: ignoring %d unused tensors, e.g. %s", args.name, len(harmless), harmless[:5])
    unknown = sorted(set(extra) - set(harmless))
    if unknown:
        logger.warning("%s: ignoring %d tensors the model code does not use, e.g. %s",
                       args.name, len(unknown), unknown[:5])
    return {key: weights[key] for key in expected}


def dummy_weights(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of every tensor `args` needs, made on `device`: norms near 1, the rest
    normal with std 1/sqrt(fan-in) (activations stay O(1) through the layers)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for key, shape in expected_weight_shapes(args).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if key.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, shape[-1] ** -0.5 if len(shape) == 2 else 0.02, generator=gen)
        weights[key] = t
    return weights


# ---------------------------------------------------------------- Hugging Face folders

def _load_hf_folder(folder: Path, name: str, with_weights: bool = True) -> LoadedCheckpoint:
    full_cfg = cfg = read_json(folder / "config.json", required=True)
    if cfg.get("model_type") == "idefics3":
        cfg = cfg.get("text_config") or {}
        if cfg.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{folder}: idefics3 with a {cfg.get('model_type')!r} language model is not supported")
        cfg = {"model_type": "llama", **cfg}
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise CheckpointError(
            f"{folder}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)})"
        )
    try:
        args = ModelArgs.from_hf_config(cfg, name=name)
    except KeyError as exc:
        raise CheckpointError(f"{folder}/config.json lacks {exc}") from exc
    tokenizer = load_hf_tokenizer(folder)
    generation_cfg = read_json(folder / "generation_config.json")
    eos_ids = args.eos_token_ids + _as_id_list(generation_cfg.get("eos_token_id")) + tokenizer.eos_token_ids
    args.eos_token_ids = tokenizer.eos_token_ids = list(dict.fromkeys(eos_ids))
    if args.bos_token_id is None:
        args.bos_token_id = tokenizer.bos_token_id
    weights = _read_safetensors(folder) if with_weights else {}
    vision = None
    if full_cfg is not cfg:
        vision = VisionCheckpoint(full_cfg, VisionSpec.from_config(full_cfg, read_json(folder / "preprocessor_config.json")),
                                  {k: weights.pop(k) for k in [k for k in weights if k.startswith(_VISION_PREFIXES)]},
                                  folder)
        weights = {k.replace("model.text_model.", "model.", 1): v for k, v in weights.items()}
        if with_weights and not vision.weights:
            raise CheckpointError(f"{folder}: an idefics3 checkpoint without vision tower weights")
    return LoadedCheckpoint(args, weights, tokenizer, vision)


_VISION_PREFIXES = ("model.vision_model.", "model.connector.")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = read_json(index, required=True).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    weights: dict[str, torch.Tensor] = {}
    for filename in files:
        if not (folder / filename).is_file():
            raise CheckpointError(f"{folder}: shard {filename} named in the index is missing")
        weights.update(load_file(folder / filename))
    return weights


def _as_id_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


# ---------------------------------------------------------------- GGUF files

def _load_gguf(path: Path, name: str) -> LoadedCheckpoint:
    try:
        reader = GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = reader.fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    args = _gguf_model_args(reader.fields, arch, tensors, name)
    weights: dict[str, torch.Tensor] = {}
    for gguf_name, tensor in tensors.items():
        hf_name = _hf_name(gguf_name)
        if hf_name is None:
            if gguf_name not in _GGUF_IGNORED:
                logger.warning("%s: ignoring unknown GGUF tensor %s", path.name, gguf_name)
            continue
        array = _dequantize(tensor)
        if arch in _PERMUTED_GGUF_ARCHS and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            array = _unpermute_rows(array, args.n_heads if ".attn_q." in gguf_name else args.n_kv_heads)
        weights[hf_name] = torch.from_numpy(array)
    return LoadedCheckpoint(args, weights, Tokenizer.from_gguf(reader.fields))


def _gguf_model_args(fields: dict[str, Any], arch: str, tensors: dict[str, Any], name: str) -> ModelArgs:
    def meta(key: str, default: Any = _REQUIRED) -> Any:
        value = fields.get(f"{arch}.{key}", None if default is _REQUIRED else default)
        if value is None and default is _REQUIRED:
            raise CheckpointError(f"GGUF metadata {arch}.{key} is missing")
        return value

    n_heads = int(meta("attention.head_count"))
    dim = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", 0)) or dim // n_heads
    rope_dims = int(meta("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"GGUF metadata {arch}.rope.dimension_count {rope_dims} != head size {head_dim}: "
                              "partial RoPE is not supported")
    rope_theta = float(meta("rope.freq_base", 10000.0))
    embed = tensors.get("token_embd.weight")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab_size = meta("vocab_size", None) or (int(embed.shape[1]) if embed is not None else len(tokens))
    eos_ids = [fields.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    return ModelArgs(
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        vocab_size=int(vocab_size),
        hidden_dim=int(meta("feed_forward_length")),
        head_dim=head_dim,
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(fields, arch, tensors, head_dim, rope_theta),
        max_seq_len=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos_id is None else int(bos_id),
        eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
        name=name,
    )


def _gguf_rope_scaling(
    fields: dict[str, Any], arch: str, tensors: dict[str, Any], head_dim: int, rope_theta: float
) -> dict | None:
    original_ctx = fields.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(tensors["rope_freqs.weight"]).astype(np.float64)
        return llama3_scaling_from_factors(factors, head_dim, rope_theta, int(original_ctx or 8192))
    kind = fields.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    for key in _GGUF_UNMAPPED_ROPE_KEYS:  # llama.cpp's own yarn knobs: no HF equivalent is derived
        if fields.get(f"{arch}.rope.scaling.{key}") is not None:
            raise CheckpointError(f"GGUF metadata {arch}.rope.scaling.{key} is not supported")
    scaling = {"rope_type": kind, "factor": float(fields.get(f"{arch}.rope.scaling.factor", 1.0))}
    if original_ctx or kind == "yarn":  # yarn's default, as transformers': the context length
        scaling["original_max_position_embeddings"] = int(original_ctx or fields.get(f"{arch}.context_length", 2048))
    return scaling  # ModelArgs rejects the types the model code does not implement


def llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, rope_theta: float, original_ctx: int = 8192
) -> dict:
    """HF `rope_scaling` (rope_type llama3) equivalent to llama.cpp's per-frequency divisors.

    llama.cpp divides frequency i by 1 (short wavelengths), by `factor` (long ones) or, in between,
    by 1 / ((1 - s) / factor + s) with s = (ctx / wavelen - low) / (high - low), linear in
    1 / wavelen. Fitting that line gives the band edges ctx / low and ctx / high; only the ratios
    matter, so any `original_ctx` gives the same rotation.
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq[: len(factors)]
    factor = float(factors.max())
    is_low = factors >= factor * (1 - 1e-5)
    is_high = factors <= 1 + 1e-5
    middle = ~is_low & ~is_high
    if middle.sum() >= 2:
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[middle], smooth, 1)
        low_wavelen, high_wavelen = -slope / intercept, slope / (1 - intercept)
    else:
        low_wavelen, high_wavelen = wavelen[is_low].min(), wavelen[is_high].max()
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(original_ctx / low_wavelen),
        "high_freq_factor": float(original_ctx / high_wavelen),
        "original_max_position_embeddings": original_ctx,
    }


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (an fp16 scale d, then 32 int8 q): q * d."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= d
    return out


def _q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 blocks (fp16 d and m, then 16 bytes: the low nibbles are values 0-15, the high ones
    16-31): q * d + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    out = np.empty((blocks.shape[0], 32), np.float32)
    np.bitwise_and(qs, 0xF, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    out *= d
    out += m
    return out


_BLOCK_DEQUANT = {GGMLQuantizationType.Q8_0: _q8_0, GGMLQuantizationType.Q4_1: _q4_1}
"""Whole-tensor dequantizers, the values of `gguf.quants.dequantize` bit for bit (tests/worker/
test_loader.py) at ~2.3x its speed: it splits a tensor into groups of rows, each a few passes."""


def _dequantize(tensor: Any) -> np.ndarray:
    """float32 array in numpy (= HF) order: the reverse of GGUF's fastest-first `shape`."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # np.asarray drops the memmap subclass, whose per-slice bookkeeping dominates otherwise
    raw, block = np.asarray(tensor.data), _BLOCK_DEQUANT.get(tensor.tensor_type)
    array = (block(raw) if block is not None else dequantize(raw, tensor.tensor_type)).reshape(shape)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    return array if array.flags.writeable else array.copy()  # never alias the read-only mmap


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute`: rows [head, dim/2, 2] back to [head, 2, dim/2]."""
    rows = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
