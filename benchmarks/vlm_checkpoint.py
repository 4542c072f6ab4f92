"""A vision-language checkpoint folder shaped like SmolVLM-256M, for `--load-format dummy` (no weights).

No VLM weights can be downloaded on the development machines, so `kvweave bench epd` writes the
config of SmolVLM-256M-Instruct (an Idefics3: a 12-layer, 768-wide SigLIP on 512x512 tiles of
16x16 patches, pixel shuffle by 4, so 64 tokens per tile; the language model is SmolLM2-135M: 30
layers, 576 wide, 9 query and 3 KV heads) with the default model's tokenizer plus Idefics3's image
tokens, and the workers make random weights of those shapes. Speed depends on the shapes only.
The image processor does not split images into tiles (`do_image_splitting` false: one 512x512
tile per image, as SmolVLM with splitting off), which keeps one cold encode near a second on a
2-core CPU; SmolVLM's default splitting multiplies the encode by the number of tiles (up to 17).
"""
from __future__ import annotations

import json
from pathlib import Path

from kvweave.defaults import DEFAULT_MODEL

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
"""Idefics3's added tokens (the processor's prompt expansion names them)."""

VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
          "num_channels": 3, "model_type": "idefics3_vision"}
TEXT = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu"}


def write_smolvlm_like(folder: Path) -> Path:
    """Write config.json, the tokenizer and the preprocessor config of a SmolVLM-256M-shaped model."""
    from tokenizers import AddedToken

    from kvweave.model_files import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    base = load_tokenizer(DEFAULT_MODEL).tokenizer
    tok = base.hf_tokenizer
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    text = TEXT | {"vocab_size": vocab, "bos_token_id": base.bos_token_id, "eos_token_id": base.eos_token_ids[0]}
    config = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "scale_factor": 4,
              "image_token_id": tok.token_to_id("<image>"), "tie_word_embeddings": True, "vision_config": VISION,
              "text_config": text, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (folder / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    tok_cfg = {"chat_template": base.chat_template, "bos_token": base.bos_token, "eos_token": base.eos_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
    processor = {"image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": False,
                 "size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512}, "do_resize": True,
                 "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_pad": True, "resample": 1,
                 "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return folder
