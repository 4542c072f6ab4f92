"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral) in the shape of gpt-fast's model.py.

Tokens of a whole batch are flattened into one [T, dim] tensor (no padding). Attention is
delegated to an `AttentionBackend` that the caller builds per forward: the model runner passes
one that reads and writes the paged KV cache; `forward_reference` passes a plain causal one.
Weights use Hugging Face names (see `load_weights`); q/k/v and gate/up are fused at load time.
Parallelism is applied from outside the model code.

On the CPU in bfloat16, every linear layer's weight is packed once at load time (`PackedLinear`):
into the compiled kernels' panels where they are built with AVX512-BF16 (worker/csrc/bf16_gemm.cpp:
1.1-2.5x oneDNN's time at the 1-64 rows of decode steps, the same at prefill sizes), else into
oneDNN's blocked layout (torch's plain `linear` reorders the weight on every call, which made the
matmuls of a decode step 1.4x to 2.4x slower). In float32 (CPUs without bf16 instructions) they are
packed into the kernels' fp32 panels where built with AVX2 and FMA (worker/csrc/f32_gemm.cpp).
`KVWEAVE_PACKED_LINEAR=0` turns packing off, `KVWEAVE_PACKED_LINEAR=onednn` keeps oneDNN's layout
(bfloat16) or the plain weights (float32).

A forward whose every token decodes over the paged cache runs all its layers in one compiled call
where the backend offers it (`fused_decode`: the same ops in the same order, without Python's
per-op cost; worker/csrc/decode_forward.cpp).
"""
from __future__ import annotations

import math
import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker import ops
from worker.config import ModelArgs
from worker.kernels import cpu_kernels


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, n_heads, hd], k/v [T, n_kv_heads, hd] of the new tokens -> [T, n_heads * hd]."""

    def fused_decode_applies(self, num_tokens: int) -> bool:
        """Whether `fused_decode` can run this forward's layers (all of them, in one call)."""

    def fused_decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: list[torch.Tensor],
                     linear_layout: int, eps: float) -> torch.Tensor:
        """The final normed hidden states [T, dim] from the embeddings x, every layer run by one
        kernel with `Transformer.decode_weights` (held in `linear_layout`)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x; with a residual, first add x to it and return (normed, new residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim // 2], float64, scaled as `args.rope_scaling` says.

    The types follow transformers' `modeling_rope_utils`: linear divides every frequency by
    `factor`; llama3 divides the low frequencies by `factor` and blends a middle band; yarn
    (arXiv:2309.00071) ramps per dimension from interpolation (/ factor) to extrapolation between the
    dimensions that turn `beta_slow` and `beta_fast` times over `original_max_position_embeddings`.
    """
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device="cpu") / hd))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv_freq / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    if kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, args.rope_theta, hd, sc)
    return inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, base: float, hd: int, sc: dict) -> torch.Tensor:
    def correction_dim(num_rotations: float) -> float:
        """The dimension whose wavelength turns `num_rotations` times over the original context."""
        old_len = sc["original_max_position_embeddings"]
        return hd * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(sc.get("beta_fast") or 32), correction_dim(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(hd // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    return inv_freq / sc["factor"] * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(args: ModelArgs) -> float:
    """The factor yarn applies to cos/sin (so q.k scales by its square); 1 for the other types."""
    sc = args.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = sc["factor"]
    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return mscale(factor, sc["mscale"]) / mscale(factor, sc["mscale_all_dim"])
    return mscale(factor)


def rope_cos_sin(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim // 2], float32 (bf16 tables lose positional precision),
    times yarn's attention factor. Computed on the host (also under a meta-device model build)."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), rope_inv_freq(args))
    scale = rope_attention_factor(args)
    return (freqs.cos() * scale).float(), (freqs.sin() * scale).float()


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialized, for the checkpoint's weights to replace: its random init
    (`normal_`) under a meta-device build imports torch._dynamo, ~1.7 s of every worker's start."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class PackedLinear(nn.Module):
    """A bias-optional linear layer whose weight is held packed: in the compiled kernels' bf16
    panels (`PANELS`) or oneDNN's blocked layout (`ONEDNN`) in bfloat16, in the kernels' fp32 panels
    (`F32_PANELS`) in float32."""

    ONEDNN, PANELS, F32_PANELS = 1, 2, 3
    """Layouts, numbered as the fused decode kernel takes them (0 there: plain weights)."""
    PANEL_WIDTH = {PANELS: 32, F32_PANELS: 16}
    """Output features per panel: a decoder layer's outputs must fill whole panels (`pack_linears`)."""
    F32_MIN_DIM = 256
    """Models narrower than this keep torch's fp32 linear: their matrices are so small that a call's
    fixed cost outweighs the weight stream (the test suite's tiny models ran slower in panels)."""
    PACK_BATCH = 16
    """The batch size oneDNN's layout is chosen for (it serves every batch size; decode batches are small)."""

    def __init__(self, linear: nn.Linear, layout: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.layout = linear.in_features, linear.out_features, layout
        weight = linear.weight.detach()
        if layout == self.PANELS:
            self.packed = cpu_kernels().pack_bf16_weight(weight)
        elif layout == self.F32_PANELS:
            self.packed = cpu_kernels().pack_f32_weight(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_BATCH)
        self.bias = linear.bias
        self.kernel_bias = torch.empty(0, dtype=weight.dtype)
        """The bias as the kernel takes it (empty: none); the panels' kernels take it in float32,
        padded to whole panels, here once rather than on every call."""
        if self.bias is not None:
            self.kernel_bias = self.bias.detach()
            if layout in self.PANEL_WIDTH:
                width = self.PANEL_WIDTH[layout]
                padded = -(-self.out_features // width) * width
                self.kernel_bias = torch.zeros(padded, dtype=torch.float32)
                self.kernel_bias[: self.out_features] = self.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernels are looked up per call: a profiler's wrapper may stand in (profiled_kernels)
        if self.layout == self.PANELS:
            return cpu_kernels().bf16_linear(x, self.packed, self.kernel_bias, self.out_features)
        if self.layout == self.F32_PANELS:
            return cpu_kernels().f32_linear(x, self.packed, self.kernel_bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """The output in float32 (logits): the panels' kernel keeps its fp32 sums unrounded."""
        if self.layout == self.PANELS:
            return cpu_kernels().bf16_linear(x, self.packed, self.kernel_bias, self.out_features, out_fp32=True)
        return self(x).float()


def linear_layout(device: torch.device, dtype: torch.dtype) -> int:
    """How the linear layers of this device and dtype are held: 0 plain, else a `PackedLinear`
    layout (CPU bfloat16: the kernels' panels where built with AVX512-BF16, else oneDNN's; CPU float32:
    the kernels' fp32 panels where built with AVX2 and FMA)."""
    mode = os.environ.get("KVWEAVE_PACKED_LINEAR", "1")
    if device.type != "cpu" or mode == "0":
        return 0
    if dtype == torch.float32:
        kernels = cpu_kernels() if mode != "onednn" else None
        return PackedLinear.F32_PANELS if kernels is not None and kernels.f32_gemm_available() else 0
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() \
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    kernels = cpu_kernels() if mode != "onednn" else None
    return PackedLinear.PANELS if kernels is not None and kernels.bf16_gemm_available() else PackedLinear.ONEDNN


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers of this device and dtype are packed."""
    return linear_layout(device, dtype) != 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.args = layer, args
        hd = args.head_dim
        self.q_size, self.kv_size = args.n_heads * hd, args.n_kv_heads * hd
        self.qkv_proj = nn.Linear(args.dim, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.q_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        a, hd = self.args, self.args.head_dim
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused output: rotate both in one pass, in place.
        qk = qkv[:, :self.q_size + self.kv_size].view(-1, a.n_heads + a.n_kv_heads, hd)
        ops.rope_(qk, cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, a.n_kv_heads, hd)
        return self.o_proj(backend.attend(self.layer, qk[:, :a.n_heads], qk[:, a.n_heads:], v))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's layout: the residual add is fused into the next norm; returns (x, residual)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32) -> None:
        """Build under `with torch.device("meta"):` to allocate nothing until `load_weights`."""
        super().__init__()
        self.args, self.dtype = args, dtype
        self.embed_tokens = embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.to(dtype)
        # float32 tables (bf16 loses positional precision), computed on the host, moved with the weights.
        self.rope_cos, self.rope_sin = rope_cos_sin(args, args.max_seq_len)
        self._decode_weights: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                num_layers: int | None = None, input_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """Hidden states [T, dim] for flat token ids and positions [T]. With `num_layers`, only the
        first layers run (writing their KV through `backend`) and nothing is returned. `input_embeds`
        [T, dim] replaces the token embeddings (image placeholders: worker/multimodal.py)."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, residual = self.embed_tokens(token_ids) if input_embeds is None else input_embeds, None
        if num_layers is None and backend.fused_decode_applies(len(token_ids)):
            return backend.fused_decode(x, cos, sin, self.decode_weights(), self.linear_layout, self.args.norm_eps)
        for layer in self.layers if num_layers is None else self.layers[:num_layers]:
            x, residual = layer(x, residual, cos, sin, backend)
        return self.norm(x, residual)[0] if num_layers is None else None

    @property
    def linear_layout(self) -> int:
        """How the linear layers hold their weights: 0 plain, else a `PackedLinear` layout (`pack_linears`)."""
        return self.lm_head.layout if isinstance(self.lm_head, PackedLinear) else 0

    def decode_weights(self) -> list[torch.Tensor]:
        """Every layer's weights in the order of the fused decode kernel (worker/csrc/decode_forward.cpp):
        input norm, qkv (bias: an empty tensor when none), output projection, post-attention norm,
        gate/up, down; then the final norm. Built once; `load_weights` drops it."""
        if self._decode_weights is None:
            def w(linear: nn.Module) -> torch.Tensor:
                return linear.packed if isinstance(linear, PackedLinear) else linear.weight

            none = torch.empty(0, dtype=self.dtype, device=self.device)
            flat = []
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if isinstance(attn.qkv_proj, PackedLinear):
                    bias = attn.qkv_proj.kernel_bias
                else:
                    bias = attn.qkv_proj.bias if attn.qkv_proj.bias is not None else none
                flat += [layer.input_layernorm.weight, w(attn.qkv_proj), bias, w(attn.o_proj),
                         layer.post_attention_layernorm.weight, w(mlp.gate_up_proj), w(mlp.down_proj)]
            self._decode_weights = [t.detach() for t in flat] + [self.norm.weight.detach()]
        return self._decode_weights

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lm_head, PackedLinear):
            return self.lm_head.forward_float(hidden)
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def forward_reference(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] of one sequence by a plain full-sequence causal forward (no cache)."""
        positions = torch.arange(len(token_ids), device=token_ids.device)
        return self.compute_logits(self.forward(token_ids, positions, CausalAttention(self.args)))

    def load_weights(self, weights: dict[str, torch.Tensor], device: torch.device | str | None = None) -> None:
        """Load Hugging Face Llama-named weights, fusing q/k/v and gate/up, in the model's dtype on
        `device` (default: where the model is; a model built on the meta device takes the loaded
        tensors as its parameters, with no other copy)."""
        device = torch.device(device) if device is not None else self.device
        if device.type == "meta":
            raise ValueError("load_weights needs a real device for a model built on the meta device")
        w = {k.removeprefix("model."): v for k, v in weights.items()}
        own = {"embed_tokens.weight": w.pop("embed_tokens.weight"), "norm.weight": w.pop("norm.weight")}
        own["lm_head.weight"] = w.pop("lm_head.weight", own["embed_tokens.weight"])
        for i in range(self.args.n_layers):
            p = f"layers.{i}."
            for name in ("input_layernorm.weight", "post_attention_layernorm.weight",
                         "self_attn.o_proj.weight", "mlp.down_proj.weight"):
                own[p + name] = w.pop(p + name)
            own[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [w.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv"])
            if self.args.attention_bias:
                own[p + "self_attn.qkv_proj.bias"] = torch.cat([w.pop(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
            own[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
        w = {k: v for k, v in w.items() if "rotary_emb" not in k}
        if w:
            raise ValueError(f"unexpected weights in checkpoint: {sorted(w)[:5]}")
        self.load_state_dict({k: v.to(device=device, dtype=self.dtype) for k, v in own.items()}, strict=True,
                             assign=True)
        self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        self._decode_weights = None
        layout = linear_layout(device, self.dtype)
        if layout == PackedLinear.F32_PANELS and self.args.dim < PackedLinear.F32_MIN_DIM:
            layout = 0
        if layout:
            self.pack_linears(layout)

    def pack_linears(self, layout: int) -> None:
        """Replace every linear layer by a PackedLinear in `layout` (its plain weight is freed unless
        shared, as a tied vocabulary projection shares the embedding's). The fused decode kernel
        takes the panels' output size from their count, so where a decoder layer's output size is not
        a multiple of the panel width, every layer keeps oneDNN's layout (bfloat16) or its plain
        weight (float32)."""
        width = PackedLinear.PANEL_WIDTH.get(layout)
        if width and any(m.out_features % width for layer in self.layers for m in layer.modules()
                         if type(m) is nn.Linear):
            layout = PackedLinear.ONEDNN if layout == PackedLinear.PANELS else 0
        if not layout:
            return
        for parent in self.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child, layout))


class CausalAttention:
    """Attention over the new tokens only: one sequence, causal (used by `forward_reference`)."""

    def __init__(self, args: ModelArgs) -> None:
        self.group = args.n_heads // args.n_kv_heads

    def fused_decode_applies(self, num_tokens: int) -> bool:
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.group > 1)
        return out[0].transpose(0, 1).reshape(q.shape[2], -1)
