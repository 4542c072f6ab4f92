"""Builders of tiny random-weight Idefics3 (SmolVLM-shaped) checkpoints and test images.

`write_idefics3_checkpoint` saves a model with transformers itself (`Idefics3Config`,
`save_pretrained`): a 2-layer SigLIP tower on 32x32 tiles of 8x8 patches, pixel shuffle by 2
(4 tokens per tile), a 2-layer Llama language model, the tiny tokenizer of tests/conftest.py plus
Idefics3's image tokens, and a preprocessor config that resizes the longest side to 64 and splits
into 32x32 tiles (so most images become 2x2 tiles + the global image).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import torch

from tests.conftest import CHATML_TEMPLATE, tiny_tokenizer_json

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TILE, LONGEST_EDGE, PATCH = 32, 64, 8


def vlm_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    return tok.to_str()


def write_idefics3_checkpoint(path: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_json = vlm_tokenizer_json()
    tok = Tokenizer.from_str(tok_json)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
        scale_factor=2, image_token_id=tok.token_to_id("<image>"))
    model = Idefics3ForConditionalGeneration(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name or "lm_head" in name or "proj.weight" in name and "connector" in name:
                param.copy_(0.3 * noise)
            elif "self_attn" in name and name.endswith("weight"):
                param.copy_(0.3 * noise)
            else:
                param.copy_(0.1 * noise)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok_cfg = {"chat_template": CHATML_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
    processor = {"image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True,
                 "size": {"longest_edge": LONGEST_EDGE}, "max_image_size": {"longest_edge": TILE},
                 "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_pad": True,
                 "resample": 1, "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (path / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return path


def make_png(width: int, height: int, seed: int = 0, poke: tuple[int, int] | None = None, fmt: str = "PNG") -> bytes:
    """A deterministic noise image; `poke` flips one pixel (x, y) to tell two images apart by one pixel."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if poke is not None:
        x, y = poke
        pixels[y, x] = 255 - pixels[y, x]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM-Instruct's chat template: it renders message content only as a list of typed parts."""


def with_smolvlm_template(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint `src` whose chat template is SmolVLM's, stored as a processor's
    chat_template.json (as SmolVLM ships it)."""
    import shutil

    shutil.copytree(src, dst)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tok_cfg["chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}), encoding="utf-8")
    return dst
