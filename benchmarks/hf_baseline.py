"""The Hugging Face `transformers` baseline of `kvweave bench engine`.

The same weights as kvweave's engine, in a `LlamaForCausalLM` built from our `ModelArgs` (SDPA
attention, the engine's dtype, denormals flushed), served the way a transformers user serves a
batch: `generate` on left-padded batches with an attention mask. Lengths are forced: no EOS token
is configured and `min_new_tokens == max_new_tokens`, so every row of a batch generates the
batch's longest request.
"""
from __future__ import annotations

import logging
import time

import torch

from worker.config import ModelArgs

logger = logging.getLogger(__name__)

PAD_ID = 0
"""Any valid id: padded positions are masked out."""


def hf_config(args: ModelArgs):
    """A `transformers.LlamaConfig` with the architecture of `args`."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        scaling = dict(args.rope_scaling)
        kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        rope = {**scaling, "rope_type": kind, "rope_theta": args.rope_theta}
    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        rope_parameters=rope, rms_norm_eps=args.norm_eps, vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_word_embeddings,
        attention_bias=args.attention_bias, bos_token_id=args.bos_token_id, eos_token_id=None,
        pad_token_id=PAD_ID,
    )


def build_hf_model(args: ModelArgs, weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """`LlamaForCausalLM` holding `weights` (Hugging Face Llama names) in `dtype`, ready for `generate`."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.set_flush_denormal(True)
    # _from_config builds in `dtype` directly, so the RoPE inverse frequencies stay float32
    # (a later `.to(bfloat16)` would round them and shift every position's rotation).
    model = LlamaForCausalLM._from_config(hf_config(args), dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    allowed = {"lm_head.weight"} if args.tie_word_embeddings else set()
    if args.attention_bias:  # Llama's attention_bias also gives o_proj a bias, which Qwen2 lacks
        allowed |= {f"model.layers.{i}.self_attn.o_proj.bias" for i in range(args.n_layers)}
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    if unexpected or set(missing) - allowed:
        raise ValueError(f"weights do not fit the HF model: missing {sorted(set(missing) - allowed)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if args.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=PAD_ID,
                                               bos_token_id=None)
    return model.eval()


def load_hf_model(model_name: str, dtype: torch.dtype):
    """Load a kvweave checkpoint (built-in name, HF folder or GGUF) into the HF baseline model."""
    from worker.loader import load_checkpoint

    start = time.perf_counter()
    ckpt = load_checkpoint(model_name, dtype=dtype)
    model = build_hf_model(ckpt.args, ckpt.weights, dtype)
    logger.info("HF baseline model %s (%s) ready in %.1fs", model_name, dtype, time.perf_counter() - start)
    return model


@torch.inference_mode()
def generate_padded(model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy `generate` of exactly `num_tokens` tokens for each prompt, left-padded into one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num_tokens,
                         min_new_tokens=num_tokens, do_sample=False)
    return out[:, width:].tolist()


def run_batched(model, prompts: list[list[int]], max_tokens: list[int], batch_size: int) -> tuple[float, int]:
    """Seconds to serve `prompts` in padded batches of `batch_size` (in order), and raw tokens generated.

    Each batch generates its longest request's `max_tokens` for every row; with batch_size 1 this
    is serving one request at a time.
    """
    start, num_raw = time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        n = max(max_tokens[i:i + batch_size])
        out = generate_padded(model, prompts[i:i + batch_size], n)
        num_raw += sum(len(row) for row in out)
    return time.perf_counter() - start, num_raw
