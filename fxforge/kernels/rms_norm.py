"""Triton kernel for fxforge::rms_norm: one program per row, the row held in registers.

Rows up to 64K channels fit one block; the statistics are computed in float32 whatever the
input dtype, matching the op's reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / n_cols
    normed = x * tl.rsqrt(mean_square + eps)
    # the reference casts back to x's dtype before the weight multiply
    normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@register_lowering("triton", "rms_norm", tolerance=FLOAT32_REORDERED)
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0] == 0:
        return out.reshape(x.shape)
    block = triton.next_power_of_2(n_cols)
    rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n_cols, rows.stride(0), eps, BLOCK=block)
    return out.reshape(x.shape)
