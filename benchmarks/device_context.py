"""What the device check's checks share (benchmarks/device_check.py runs them): the model shapes,
the run's `Context` (device, temporary model folders, engines, timing) and the prompts."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True}
"""SmolLM2-135M's shapes (the default model)."""
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 49152, "rope_theta": 500000.0, "tie_word_embeddings": False}
"""Llama-3-8B's layers, with the vocabulary of the tokenizer at hand."""
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "rope_theta": 10000.0, "tie_word_embeddings": True}
"""--smoke: every check's code on the CPU in seconds."""
SMOKE_CACHE_GB = 0.02
"""--smoke: each engine's device KV cache and DRAM tier (thousands of TINY blocks; a GiB would take
seconds to allocate and index on the CPU)."""
BF16_LOGIT_TOL = 0.05
"""The bf16 engine's logits may differ from the fp32 reference by this fraction of the largest logit."""
class Skip(Exception):
    """A check that cannot run here, with the reason."""


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer_dir = Path(args.tokenizer_dir)
        self.work = Path(tempfile.mkdtemp(prefix="kvweave-device-check-"))
        self.deadline = time.monotonic() + args.budget_s
        self.log = args.log

    def shape(self, big: dict) -> dict:
        return TINY if self.smoke else big

    def model_folder(self, name: str, shape: dict, weights_dtype: torch.dtype | None = None, seed: int = 0) -> Path:
        """A Hugging Face folder: config.json and the tokenizer, and with `weights_dtype`, random
        weights saved by transformers itself (scaled so that greedy choices are clear-cut)."""
        folder = self.work / name
        if folder.exists():
            return folder
        folder.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(self.tokenizer_dir / f, folder / f)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                  "attention_bias": False, "torch_dtype": "float32", **shape}
        if weights_dtype is None:
            (folder / "config.json").write_text(json.dumps(config, indent=1))
            return folder
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**config)).to(weights_dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:  # std 1/sqrt(fan-in); attention x2 so positions matter; logits of spread ~6
                    scale = (2.0 if "self_attn" in pname else 6.0 if "embed" in pname else 1.0) / p.shape[-1] ** 0.5
                    p.copy_(scale * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
        return folder

    def engine(self, folder: Path, dtype: str, **config):
        from worker.engine import EngineConfig, LLMEngine

        return LLMEngine(EngineConfig(model=str(folder), dtype=dtype, device=str(self.device), **config))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, iters: int, warmup: int = 2) -> float:
        """Seconds per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t) / iters

    def needs_cuda(self) -> None:
        if self.device.type != "cuda":
            raise Skip("needs a CUDA device")


def prompts(n: int, length: int | tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (length, length) if isinstance(length, int) else length
    lens = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lens]


def greedy(max_tokens: int):
    from kvweave.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
