"""Every config.json form transformers writes loads into the model transformers builds from it.

Each case saves a tiny random-weight model with the installed transformers (`save_pretrained`),
loads the folder with kvweave's loader and compares kvweave's fp32 logits with transformers' own
forward on the same folder: max abs diff < 5e-4 on logits of magnitude ~10 (float32 rounding over
200 positions; the RoPE tables are computed in float64 here and float32 there; measured 2e-5 to
1.1e-4). Prompts run past `original_max_position_embeddings` (32), so every scaled frequency band
is exercised, and dropping the scaling moves the logits by more than 100x the tolerance. Fields the model code does not implement are refused
with a `ConfigError` naming the field.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from worker.config import ConfigError  # noqa: E402
from worker.loader import LoadedCheckpoint, load_checkpoint  # noqa: E402
from worker.model import Transformer  # noqa: E402

TOLERANCE = 5e-4
"""Max abs logit difference allowed between kvweave and transformers (fp32, logits up to ~12)."""
ORIGINAL_CTX = 32
PROMPT_LEN = 200
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=True)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": ORIGINAL_CTX}
SCALED_ROPE = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX},
    "yarn": YARN,
    "yarn-params": YARN | {"beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3, "truncate": False},
    "yarn-mscale": YARN | {"mscale": 1.0, "mscale_all_dim": 0.5},
}
"""Scaled RoPE in transformers 5's `rope_parameters` form."""

CASES = {
    "llama-theta-500k": (LlamaConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    **{f"llama-{name}": (LlamaConfig, {"rope_parameters": rope}) for name, rope in SCALED_ROPE.items()},
    "llama-head-dim-untied": (LlamaConfig, {"head_dim": 32, "tie_word_embeddings": False}),
    "mistral-no-window-head-dim": (MistralConfig, {"sliding_window": None, "head_dim": 32}),
    "mistral-window-beyond-context": (MistralConfig, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen2-window-off": (Qwen2Config, {"use_sliding_window": False, "sliding_window": 16}),
    "qwen2-window-unused": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "qwen2-yarn": (Qwen2Config, {"rope_parameters": YARN}),
    "qwen2-head-dim-untied": (Qwen2Config, {"head_dim": 8, "tie_word_embeddings": False}),
}
"""Name -> (transformers config class, fields beyond SIZES)."""


def _save(writer, folder: Path, config_cls, fields: dict, seed: int = 0) -> Path:
    return writer(folder, config_cls(**(SIZES | fields)), seed=seed)


def _prompt(vocab_size: int, length: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def _kvweave_logits(ckpt: LoadedCheckpoint, ids: list[int]) -> torch.Tensor:
    model = Transformer(ckpt.args, torch.float32)
    model.load_weights(ckpt.weights)
    return model.forward_reference(torch.tensor(ids))


@torch.inference_mode()
def _transformers_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model(torch.tensor([ids])).logits[0].float()


def _assert_same_logits(folder: Path, ids: list[int]) -> LoadedCheckpoint:
    ckpt = load_checkpoint(str(folder))
    ours, theirs = _kvweave_logits(ckpt, ids), _transformers_logits(folder, ids)
    assert theirs.std() > 0.5  # lively weights: the comparison is not between near-constant logits
    assert (ours - theirs).abs().max().item() < TOLERANCE
    return ckpt


def _edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> None:
    path = folder / "config.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps(cfg | changes, indent=1))


# ------------------------------------------------------------ same logits as transformers

@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case: str, tmp_path: Path, transformers_checkpoint_writer) -> None:
    config_cls, fields = CASES[case]
    folder = _save(transformers_checkpoint_writer, tmp_path / case, config_cls, fields, seed=len(case))
    ckpt = load_checkpoint(str(folder))
    _assert_same_logits(folder, _prompt(ckpt.args.vocab_size))


def test_rope_parameters_theta_is_read(tmp_path: Path, transformers_checkpoint_writer) -> None:
    """Regression: transformers 5 writes rope_theta only inside rope_parameters; it was read as 10000."""
    folder = _save(transformers_checkpoint_writer, tmp_path / "theta", LlamaConfig,
                   {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == 500000.0
    args = load_checkpoint(str(folder)).args
    assert (args.rope_theta, args.rope_scaling) == (500000.0, None)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn", "yarn-params"])
def test_scaling_is_exercised(name: str, tmp_path: Path, transformers_checkpoint_writer) -> None:
    """The prompts reach the scaled band: dropping the scaling moves the logits far beyond TOLERANCE."""
    folder = _save(transformers_checkpoint_writer, tmp_path / name, LlamaConfig,
                   {"rope_parameters": SCALED_ROPE[name]})
    ckpt = load_checkpoint(str(folder))
    ids = _prompt(ckpt.args.vocab_size)
    ckpt.args.rope_scaling = None
    assert (_kvweave_logits(ckpt, ids) - _transformers_logits(folder, ids)).abs().max().item() > 100 * TOLERANCE


def test_yarn_attention_factor_is_exercised(tmp_path: Path, transformers_checkpoint_writer) -> None:
    folder = _save(transformers_checkpoint_writer, tmp_path / "yarn", LlamaConfig, {"rope_parameters": YARN})
    ckpt = load_checkpoint(str(folder))
    ids = _prompt(ckpt.args.vocab_size)
    ckpt.args.rope_scaling["attention_factor"] = 1.0  # instead of 0.1 * ln(8) + 1
    assert (_kvweave_logits(ckpt, ids) - _transformers_logits(folder, ids)).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn", "yarn-params"])
def test_transformers_4_form(name: str, tmp_path: Path, transformers_checkpoint_writer) -> None:
    """rope_theta at the top level and a `rope_scaling` dict with the old `type` key, written by hand."""
    rope = dict(SCALED_ROPE[name])
    folder = _save(transformers_checkpoint_writer, tmp_path / name, LlamaConfig, {"rope_parameters": rope})
    args_5 = load_checkpoint(str(folder)).args
    theta, kind = rope.pop("rope_theta"), rope.pop("rope_type")
    _edit_config(folder, drop=("rope_parameters",), rope_theta=theta, rope_scaling={"type": kind, **rope},
                 torch_dtype="float32", transformers_version="4.46.0")
    ckpt = _assert_same_logits(folder, _prompt(args_5.vocab_size))
    assert ckpt.args == args_5


def test_transformers_4_yarn_defaults(tmp_path: Path, transformers_checkpoint_writer) -> None:
    """4.x yarn without original_max_position_embeddings: it defaults to max_position_embeddings."""
    folder = _save(transformers_checkpoint_writer, tmp_path / "yarn", LlamaConfig, {"rope_parameters": YARN})
    _edit_config(folder, drop=("rope_parameters",), rope_theta=10000.0, max_position_embeddings=ORIGINAL_CTX,
                 rope_scaling={"type": "yarn", "factor": 4.0})
    ckpt = _assert_same_logits(folder, _prompt(512, ORIGINAL_CTX))
    assert ckpt.args.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": ORIGINAL_CTX}


def test_llama3_without_original_context(tmp_path: Path, transformers_checkpoint_writer) -> None:
    """transformers 5 fills llama3's original_max_position_embeddings from max_position_embeddings."""
    rope = {k: v for k, v in SCALED_ROPE["llama3"].items() if k != "original_max_position_embeddings"}
    folder = _save(transformers_checkpoint_writer, tmp_path / "llama3", LlamaConfig, {"rope_parameters": rope})
    _edit_config(folder, rope_parameters=rope)  # save_pretrained writes the filled-in value back
    ckpt = _assert_same_logits(folder, _prompt(512))
    assert ckpt.args.rope_scaling["original_max_position_embeddings"] == SIZES["max_position_embeddings"]


# ------------------------------------------------------------ sliding windows cap the context

def test_mistral_window_caps_the_context(tmp_path: Path, transformers_checkpoint_writer, caplog) -> None:
    folder = _save(transformers_checkpoint_writer, tmp_path / "mistral", MistralConfig, {"sliding_window": 64})
    with caplog.at_level(logging.WARNING, logger="worker.config"):
        ckpt = _assert_same_logits(folder, _prompt(512, 64))
    assert ckpt.args.max_seq_len == 64
    assert "sliding_window 64 < max_position_embeddings 256: serving a context of 64 tokens" in caplog.text


@pytest.mark.parametrize("form", ["5.x", "4.x"])
def test_qwen2_window_caps_the_context(form: str, tmp_path: Path, transformers_checkpoint_writer) -> None:
    """use_sliding_window with max_window_layers 1 of 2: layer 1 slides, so the window caps the context."""
    folder = _save(transformers_checkpoint_writer, tmp_path / "qwen2", Qwen2Config,
                   {"use_sliding_window": True, "sliding_window": 48, "max_window_layers": 1})
    if form == "4.x":  # no layer_types: derived from max_window_layers
        _edit_config(folder, drop=("layer_types",))
    assert _assert_same_logits(folder, _prompt(512, 48)).args.max_seq_len == 48


def test_qwen2_window_off_keeps_the_context(tmp_path: Path, transformers_checkpoint_writer) -> None:
    folder = _save(transformers_checkpoint_writer, tmp_path / "qwen2", Qwen2Config,
                   {"use_sliding_window": False, "sliding_window": 16})
    args = load_checkpoint(str(folder)).args
    assert (args.max_seq_len, args.attention_bias) == (256, True)


# ------------------------------------------------------------ refused fields

ROPE_5 = {"rope_theta": 10000.0}
REFUSED = {
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias: true is not supported"),
    "attention_bias": ({"attention_bias": True}, "attention_bias: true is not supported for llama"),
    "dynamic": ({"rope_parameters": ROPE_5 | {"rope_type": "dynamic", "factor": 2.0}},
                "rope_parameters.rope_type 'dynamic' is not supported: dynamic NTK"),
    "longrope": ({"rope_parameters": ROPE_5 | {"rope_type": "longrope", "factor": 2.0}},
                 "rope_parameters.rope_type 'longrope' is not supported"),
    "4.x-dynamic": ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                    "rope_scaling.rope_type 'dynamic' is not supported"),
    "unknown-rope-field": ({"rope_parameters": YARN | {"ext_factor": 1.0}},
                           "rope_parameters: field 'ext_factor' is not understood for rope_type 'yarn'"),
    "linear-without-factor": ({"rope_parameters": ROPE_5 | {"rope_type": "linear"}},
                              "rope_parameters: rope_type 'linear' needs 'factor'"),
    "partial_rotary_factor": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    "rope-partial_rotary_factor": ({"rope_parameters": ROPE_5 | {"rope_type": "default", "partial_rotary_factor": 0.5}},
                                   "rope_parameters.partial_rotary_factor 0.5 is not supported"),
    "both-rope-forms": ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                        "both rope_parameters and rope_scaling are set"),
    "quantization_config": ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
                            r"quantization_config \(gptq\) is not supported"),
    "dtype": ({"dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn' is not supported"),
    "torch_dtype": ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not supported"),
    "layer_types": ({"layer_types": ["full_attention", "chunked_attention"]},
                    r"layer_types \['chunked_attention'\] are not supported"),
    "llama-sliding_window": ({"sliding_window": 64}, "sliding_window is not part of a llama model"),
}
"""Name -> (changes to a transformers-5 llama config.json, the ConfigError's message)."""


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory, transformers_checkpoint_writer) -> Path:
    return transformers_checkpoint_writer(tmp_path_factory.mktemp("models") / "llama", LlamaConfig(**SIZES))


@pytest.mark.parametrize("name", REFUSED)
def test_refused_field_is_named(name: str, tmp_path: Path, llama_folder: Path) -> None:
    changes, message = REFUSED[name]
    folder = shutil.copytree(llama_folder, tmp_path / name)
    _edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(str(folder))


def test_fields_without_effect_are_accepted(tmp_path: Path, llama_folder: Path) -> None:
    folder = shutil.copytree(llama_folder, tmp_path / "extras")
    _edit_config(folder, architectures=["LlamaForCausalLM"], transformers_version="4.40.0", use_cache=False,
                 initializer_range=0.5, attention_dropout=0.1, pretraining_tp=1, pad_token_id=0,
                 rope_interleaved=False, torch_dtype="bfloat16", mlp_bias=False, attention_bias=False)
    assert load_checkpoint(str(folder)).args.rope_theta == 10000.0
