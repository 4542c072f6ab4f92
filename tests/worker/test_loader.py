"""Checkpoint loading: HF folders and GGUF files give the same HF-named tensors and ModelArgs."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from worker.config import ConfigError, ModelArgs
from kvweave.model_files import BUILTIN_MODELS, CheckpointError, ModelNotFoundError, resolve_model
from worker.loader import _BLOCK_DEQUANT, LoadedCheckpoint, expected_weight_shapes, load_checkpoint

SHARED_ARGS = [f.name for f in fields(ModelArgs) if f.name not in ("norm_eps", "name")]


@pytest.fixture(scope="module")
def hf_ckpt(tiny_hf_model: Path) -> LoadedCheckpoint:
    return load_checkpoint(str(tiny_hf_model))


@pytest.fixture(scope="module")
def gguf_ckpt(tiny_gguf_model: Path) -> LoadedCheckpoint:
    return load_checkpoint(str(tiny_gguf_model))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_args(a: ModelArgs, b: ModelArgs) -> None:
    for name in SHARED_ARGS:
        assert getattr(a, name) == getattr(b, name), name
    assert a.norm_eps == pytest.approx(b.norm_eps, rel=1e-6)  # GGUF stores it as float32


@pytest.mark.parametrize("qtype", sorted(_BLOCK_DEQUANT, key=lambda t: t.name))
def test_block_dequantizers_equal_gguf_py(qtype) -> None:
    """Random blocks (every nibble and int8 value, scales of both signs and of tiny and large
    magnitude): the loader's whole-tensor dequantizers give gguf-py's values bit for bit."""
    rng = np.random.default_rng(0)
    block_bytes, scale_bytes = {gguf.GGMLQuantizationType.Q8_0: (34, 2), gguf.GGMLQuantizationType.Q4_1: (20, 4)}[qtype]
    raw = rng.integers(0, 256, (4096, block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal((4096, scale_bytes // 2)) * 10.0 ** rng.integers(-6, 3, (4096, 1)))
    raw[:, :scale_bytes] = scales.astype(np.float16).view(np.uint8)
    want = gguf.quants.dequantize(raw.reshape(-1), qtype)
    got = _BLOCK_DEQUANT[qtype](raw.reshape(-1))
    assert got.dtype == np.float32 and np.array_equal(got.reshape(-1), want.reshape(-1).astype(np.float32))


def test_hf_folder_names_shapes_and_args(hf_ckpt: LoadedCheckpoint) -> None:
    args = hf_ckpt.args
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (2, 64, 4, 2, 16)
    assert args.tie_word_embeddings and not args.attention_bias
    assert (args.bos_token_id, args.eos_token_ids, args.name) == (1, [2], "tiny-llama")
    assert "lm_head.weight" not in hf_ckpt.weights
    assert {k: tuple(v.shape) for k, v in hf_ckpt.weights.items()} == expected_weight_shapes(args)
    assert hf_ckpt.weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert all(v.dtype == torch.float32 for v in hf_ckpt.weights.values())
    assert hf_ckpt.tokenizer.eos_token_ids == [2]


def test_gguf_matches_hf_folder(hf_ckpt: LoadedCheckpoint, gguf_ckpt: LoadedCheckpoint) -> None:
    assert_same_weights(hf_ckpt.weights, gguf_ckpt.weights)  # exact: F32, permutation undone
    assert_same_args(hf_ckpt.args, gguf_ckpt.args)
    assert gguf_ckpt.args.name == "tiny-llama"


def test_gguf_file_really_permutes_q_and_k(tiny_gguf_model: Path, hf_ckpt: LoadedCheckpoint) -> None:
    raw = {t.name: t.data for t in gguf.GGUFReader(tiny_gguf_model).tensors}
    q = torch.from_numpy(raw["blk.0.attn_q.weight"].copy())
    v = torch.from_numpy(raw["blk.0.attn_v.weight"].copy())
    assert not torch.equal(q, hf_ckpt.weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(v, hf_ckpt.weights["model.layers.0.self_attn.v_proj.weight"])


def test_untied_checkpoint_keeps_lm_head(tmp_path: Path, hf_checkpoint_writer, gguf_checkpoint_writer) -> None:
    folder = hf_checkpoint_writer(tmp_path / "untied", tie=False, n_heads=8, n_kv_heads=8, seed=3)
    hf = load_checkpoint(str(folder))
    gg = load_checkpoint(str(gguf_checkpoint_writer(tmp_path / "untied.gguf", folder)))
    assert not hf.args.tie_word_embeddings and "lm_head.weight" in hf.weights
    assert_same_weights(hf.weights, gg.weights)
    assert_same_args(hf.args, gg.args)


def test_sharded_loads_like_unsharded(tmp_path: Path, hf_checkpoint_writer) -> None:
    single = load_checkpoint(str(hf_checkpoint_writer(tmp_path / "single", seed=5)))
    folder = hf_checkpoint_writer(tmp_path / "sharded", seed=5, sharded=True)
    assert len(list(folder.glob("*.safetensors"))) == 2
    sharded = load_checkpoint(str(folder))
    assert_same_weights(single.weights, sharded.weights)


def test_qwen2_attention_bias(tmp_path: Path, hf_checkpoint_writer, gguf_checkpoint_writer) -> None:
    folder = hf_checkpoint_writer(tmp_path / "qwen", attention_bias=True)
    hf = load_checkpoint(str(folder))
    assert hf.args.attention_bias
    assert hf.weights["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert hf.weights["model.layers.1.self_attn.v_proj.bias"].shape == (32,)
    gg = load_checkpoint(str(gguf_checkpoint_writer(tmp_path / "qwen.gguf", folder)))
    assert gg.args.attention_bias
    assert_same_weights(hf.weights, gg.weights)


def test_llama3_rope_scaling_survives_gguf(tmp_path: Path, hf_checkpoint_writer, gguf_checkpoint_writer) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    folder = hf_checkpoint_writer(tmp_path / "llama3", n_heads=1, n_kv_heads=1, dim=64, rope_scaling=scaling)
    assert load_checkpoint(str(folder)).args.rope_scaling == scaling
    got = load_checkpoint(str(gguf_checkpoint_writer(tmp_path / "llama3.gguf", folder))).args.rope_scaling
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0
    # Only the band edges ctx/low and ctx/high are recoverable; they define the same rotation.
    ctx = got["original_max_position_embeddings"]
    assert ctx / got["low_freq_factor"] == pytest.approx(64 / 1.0, rel=1e-4)
    assert ctx / got["high_freq_factor"] == pytest.approx(64 / 4.0, rel=1e-4)


def test_dtype_cast(tiny_hf_model: Path) -> None:
    ckpt = load_checkpoint(str(tiny_hf_model), dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in ckpt.weights.values())


def test_dummy_format_reads_only_the_config_and_tokenizer(tmp_path: Path, tiny_hf_model: Path,
                                                           tiny_gguf_model: Path) -> None:
    """`load_format="dummy"`: a folder with config.json and the tokenizer but no weights gives random
    weights of every expected shape, the same for the same seed; a file is refused."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in tiny_hf_model.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, folder / f.name)
    ckpt = load_checkpoint(str(folder), torch.bfloat16, load_format="dummy")
    real = load_checkpoint(str(tiny_hf_model))
    assert_same_args(ckpt.args, real.args)
    assert {k: tuple(v.shape) for k, v in ckpt.weights.items()} == expected_weight_shapes(ckpt.args)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in ckpt.weights.values())
    assert_same_weights(ckpt.weights, load_checkpoint(str(folder), torch.bfloat16, load_format="dummy").weights)
    with pytest.raises(CheckpointError, match="load_format dummy"):
        load_checkpoint(str(tiny_gguf_model), load_format="dummy")
    with pytest.raises(CheckpointError, match="unknown load_format"):
        load_checkpoint(str(folder), load_format="random")


def test_eos_ids_union_of_config_generation_config_and_tokenizer(tmp_path: Path, hf_checkpoint_writer) -> None:
    folder = hf_checkpoint_writer(tmp_path / "eos")
    _edit_json(folder / "config.json", eos_token_id=0)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    ckpt = load_checkpoint(str(folder))
    assert ckpt.args.eos_token_ids == ckpt.tokenizer.eos_token_ids == [0, 1, 2]


# ------------------------------------------------------------ errors

def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model.*smollm2-135m"):
        resolve_model("no-such-model")
    assert issubclass(ModelNotFoundError, ValueError)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        load_checkpoint(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path / "empty"))


def test_unsupported_hf_model_type(tmp_path: Path, tiny_hf_model: Path) -> None:
    folder = shutil.copytree(tiny_hf_model, tmp_path / "gpt2")
    _edit_json(folder / "config.json", model_type="gpt2")
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'.*llama"):
        load_checkpoint(str(folder))


def test_missing_tensor_is_named(tmp_path: Path, tiny_hf_model: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_hf_model, tmp_path / "broken")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(str(folder))


def test_wrong_shape_is_reported(tmp_path: Path, tiny_hf_model: Path) -> None:
    folder = shutil.copytree(tiny_hf_model, tmp_path / "shape")
    _edit_json(folder / "config.json", intermediate_size=96)
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        load_checkpoint(str(folder))


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'phi3'.*llama"):
        load_checkpoint(str(path))


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_checkpoint(str(tmp_path / "junk.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unsupported_rope_scaling_type(tmp_path: Path, hf_checkpoint_writer) -> None:
    folder = hf_checkpoint_writer(tmp_path / "longrope", rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope_scaling.rope_type 'longrope'"):
        load_checkpoint(str(folder))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# ------------------------------------------------------------ same logits through the model

@pytest.fixture(scope="module")
def transformer_cls():
    model = pytest.importorskip("worker.model", reason="worker/model.py is not written yet")
    return model.Transformer


def _logits(transformer_cls, ckpt: LoadedCheckpoint, ids: list[int]) -> torch.Tensor:
    model = transformer_cls(ckpt.args, torch.float32)
    model.load_weights(ckpt.weights)
    with torch.no_grad():
        return model.forward_reference(torch.tensor(ids, dtype=torch.long))


def test_hf_and_gguf_give_the_same_logits(
    transformer_cls, hf_ckpt: LoadedCheckpoint, gguf_ckpt: LoadedCheckpoint
) -> None:
    ids = hf_ckpt.tokenizer.encode_chat([{"role": "user", "content": "Hello there, 12 apples 🙂"}])
    hf_logits = _logits(transformer_cls, hf_ckpt, ids)
    assert hf_logits.shape == (len(ids), hf_ckpt.args.vocab_size)
    assert hf_logits.std() > 0.1  # the random weights give non-degenerate logits
    assert torch.equal(hf_logits, _logits(transformer_cls, gguf_ckpt, ids))  # identical weights, same code


def test_qwen2_hf_and_gguf_give_the_same_logits(
    transformer_cls, tmp_path: Path, hf_checkpoint_writer, gguf_checkpoint_writer
) -> None:
    folder = hf_checkpoint_writer(tmp_path / "qwen", attention_bias=True, seed=7)
    hf = load_checkpoint(str(folder))
    gg = load_checkpoint(str(gguf_checkpoint_writer(tmp_path / "qwen.gguf", folder)))
    ids = hf.tokenizer.encode("The quick brown fox 42")
    assert torch.equal(_logits(transformer_cls, hf, ids), _logits(transformer_cls, gg, ids))


# ------------------------------------------------------------ the real default model

def test_builtin_resolves_to_packaged_gguf(default_model_path: Path) -> None:
    assert default_model_path.name == BUILTIN_MODELS["smollm2-135m"][1]
    assert default_model_path.is_file()
    assert resolve_model("SmolLM2-135M") == default_model_path


@pytest.mark.slow
def test_default_model_loads(default_checkpoint: LoadedCheckpoint) -> None:
    args, weights = default_checkpoint.args, default_checkpoint.weights
    assert args.name == "smollm2-135m"
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == (30, 576, 9, 3, 64)
    assert (args.vocab_size, args.hidden_dim, args.rope_theta, args.max_seq_len) == (49152, 1536, 100000.0, 8192)
    assert args.tie_word_embeddings and not args.attention_bias and args.rope_scaling is None
    assert (args.bos_token_id, args.eos_token_ids) == (1, [2])
    assert "lm_head.weight" not in weights
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_weight_shapes(args)
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(torch.isfinite(v.sum()) for v in weights.values())


@pytest.mark.slow
def test_default_model_answers_sensibly(transformer_cls, default_checkpoint: LoadedCheckpoint) -> None:
    """End-to-end check of the real GGUF path (dequantization, q/k unpermute, tokenizer): greedy answer."""
    tok = default_checkpoint.tokenizer
    model = transformer_cls(default_checkpoint.args, torch.float32)
    model.load_weights(default_checkpoint.weights)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.encode("The capital of France is Paris.")  # SmolLM2-135M-Instruct's greedy answer
    logits = model.forward_reference(torch.tensor(ids + answer, dtype=torch.long))
    predicted = logits[len(ids) - 1: len(ids) - 1 + len(answer)].argmax(-1).tolist()
    assert tok.decode(predicted[:6]) == "The capital of France is Paris"  # teacher-forced greedy, one forward
