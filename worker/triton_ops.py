"""The decoder layer's elementwise ops as Triton kernels (the GPU path): add+RMSNorm in one pass
(the residual updated and normalized without a round trip through memory), SiLU-and-mul of the
fused gate/up output, and RoPE in place on the q/k part of the fused qkv output (rows strided).

Each kernel takes one row (token) per program, computes in fp32 and stores in the tensor's dtype,
as the CPU kernels (worker/csrc) and the torch fallbacks of worker/ops.py do, so all three agree to
rounding. On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1): that is how the tests
check them; `KVWEAVE_ELEMENTWISE=triton` makes worker/ops.py use them on any device (tests), and on
CUDA they are the default (`KVWEAVE_ELEMENTWISE=torch` turns them off).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, stride_x, stride_r, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32) + x
    r = r.to(R.dtype.element_ty)
    tl.store(R + row * stride_r + cols, r, mask=mask)
    r = r.to(tl.float32)  # normalized as stored, as the other paths do
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / n + eps)
    tl.store(X + row * stride_x + cols, (r * inv * w).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(X, COS, SIN, stride_t, stride_h, stride_c, heads, HALF: tl.constexpr, H_PAD: tl.constexpr,
                 D_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.arange(0, H_PAD)[:, None]
    i = tl.arange(0, D_PAD)[None, :]
    mask = (h < heads) & (i < HALF)
    base = X + t * stride_t + h * stride_h + i
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + t * stride_c + i, mask=i < HALF, other=0.0)
    s = tl.load(SIN + t * stride_c + i, mask=i < HALF, other=0.0)
    tl.store(base, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then x = RMSNorm(residual) * weight, in place: returns (x, residual)."""
    rows, n = x.shape
    if rows:
        _add_rms_norm_kernel[(rows,)](x, residual, weight, x.stride(0), residual.stride(0), n, eps,
                                      BLOCK=triton.next_power_of_2(n))
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2d] (gate, up) -> silu(gate) * up [T, d]."""
    rows, two_d = x.shape
    d = two_d // 2
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows:
        _silu_and_mul_kernel[(rows,)](x, out, x.stride(0), out.stride(0), d, BLOCK=min(1024, triton.next_power_of_2(d)))
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, hd] in place (half-split layout; rows may be strided, heads and the last
    dim contiguous within a row); cos/sin [T, hd // 2] fp32."""
    tokens, heads, hd = x.shape
    if tokens:
        _rope_kernel[(tokens,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, HALF=hd // 2,
                                H_PAD=triton.next_power_of_2(heads), D_PAD=triton.next_power_of_2(hd // 2))
