"""Elementwise ops of the decoder layer: the compiled CPU kernels (worker/csrc), the Triton kernels
on CUDA (worker/triton_ops.py), torch otherwise.

Every path computes in float32 and stores in the tensor's dtype, so they agree to rounding.
`KVWEAVE_ELEMENTWISE=triton|torch` forces the Triton kernels (any device: the tests run them on the
CPU under Triton's interpreter) or torch's ops.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from worker.kernels import cpu_kernels


def _kernels_for(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or _FORCED:
        return None
    return cpu_kernels()


_FORCED = os.environ.get("KVWEAVE_ELEMENTWISE", "")


def _triton_for(x: torch.Tensor):
    """worker.triton_ops when `x`'s op runs there (imported on first use: Triton only where used)."""
    if _FORCED == "triton" or (not _FORCED and x.device.type == "cuda"):
        from worker import triton_ops

        return triton_ops
    return None


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, hd] in place (Hugging Face half-split layout); cos/sin [T, hd // 2] fp32."""
    t = _triton_for(x)
    if t is not None and x.stride(-1) == 1 and x.stride(1) == x.shape[2]:
        t.rope_(x, cos, sin)
        return
    k = _kernels_for(x)
    if k is not None and x.stride(-1) == 1:
        k.rope_inplace(x, cos, sin)
        return
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2d] (gate, up) -> silu(gate) * up [T, d]."""
    t = _triton_for(x)
    if t is not None and x.stride(-1) == 1:
        return t.silu_and_mul(x)
    k = _kernels_for(x)
    if k is not None:
        return k.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then normalize it: returns (normed, residual); may reuse x's storage."""
    t = _triton_for(x)
    if t is not None and x.is_contiguous() and residual.is_contiguous():
        return t.add_rms_norm(x, residual, weight, eps)
    k = _kernels_for(x)
    if k is not None and x.is_contiguous() and residual.is_contiguous():
        k.add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual
