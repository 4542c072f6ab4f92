"""A decode-only forward run by the fused kernel (all layers in one compiled call) gives bitwise the
tokens, logprobs and KV cache of the layer-by-layer Python forward: the same ops in the same order."""
from __future__ import annotations

import pytest
import torch

from kvweave.sampling_params import SamplingParams
from worker import attention
from worker.engine import EngineConfig, LLMEngine
from worker.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="CPU kernels could not be built here")

PROMPTS = [[(i * 37 + j * 11) % 200 + 3 for i in range(n)] for j, n in enumerate((5, 23, 40))]


def run(model: str, dtype: str, fused: bool, monkeypatch) -> tuple[list, torch.Tensor, int]:
    monkeypatch.setattr(attention, "FUSED_DECODE", fused)
    calls = []
    original = attention.PagedAttention.fused_decode

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)
    monkeypatch.setattr(attention.PagedAttention, "fused_decode", counted)
    eng = LLMEngine(EngineConfig(model=model, dtype=dtype, num_blocks=64, block_size=16))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    outs = eng.generate(PROMPTS, params)
    return [(o.token_ids, o.logprobs) for o in outs], eng.runner.kv_cache.clone(), len(calls)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["tiny", "head_dim_64_with_bias"])
def test_fused_decode_is_bitwise_the_python_forward(dtype, shape, tiny_hf_model, hf_checkpoint_writer,
                                                     tmp_path, monkeypatch):
    model = str(tiny_hf_model)
    if shape != "tiny":  # the vectorized attention path (head_dim 64), a qkv bias (Qwen2)
        model = str(hf_checkpoint_writer(tmp_path / "m", dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256,
                                         attention_bias=True))
    fused, fused_cache, n_fused = run(model, dtype, True, monkeypatch)
    plain, plain_cache, n_plain = run(model, dtype, False, monkeypatch)
    assert n_fused >= 10 and n_plain == 0  # every decode step fused (12 tokens: 11 decode steps)
    assert fused == plain
    assert torch.equal(fused_cache, plain_cache)
