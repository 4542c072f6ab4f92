"""Elementwise ops of the decoder layer: the compiled kernels where available, torch otherwise.

Both paths compute in float32 and store in the tensor's dtype, so they agree to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.kernels import cpu_kernels


def _kernels_for(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_kernels()


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, hd] in place (Hugging Face half-split layout); cos/sin [T, hd // 2] fp32."""
    k = _kernels_for(x)
    if k is not None and x.stride(-1) == 1:
        k.rope_inplace(x, cos, sin)
        return
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2d] (gate, up) -> silu(gate) * up [T, d]."""
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
    k = _kernels_for(x)
    if k is not None and x.is_contiguous() and residual.is_contiguous():
        k.add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual
