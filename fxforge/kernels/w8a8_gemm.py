"""Triton kernels for `fxforge::linear_w8a8`: per-token int8 quantization + int8 GEMM.

1. `quantize_rows_kernel`: one program per token; pass 1 finds max|x|, pass 2 writes
   x8 = clamp(round_half_even(x / s), -127, 127) with s = max|x|/127 (1 for a zero row) and
   stores s. The division is `tl.div_rn` (IEEE rounded, not the approximate GPU divide) and
   rounding is done by hand because libdevice.rint is missing under the interpreter, so the
   codes are bit-identical to the reference's.
2. `w8a8_gemm_kernel`: int8 x int8 -> int32 `tl.dot` (wgmma s8 on Hopper) over K, then the
   epilogue (acc * s_x[m]) * wscale[n] + bias[n] in float32, the reference's order.
Helper @triton.jit functions are avoided so `compile_for_hopper` sees one function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.ops.linear_w8a8 import check_w8a8_args
from fxforge.kernels._common import autotune_configs

# First config = the interpreter's: small, so test shapes span several tiles and a K tail.
# int8 wgmma needs BLOCK_K >= 32.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]
QUANT_BLOCK_K = 1024


@triton.jit
def quantize_rows_kernel(x_ptr, x8_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """Symmetric per-row int8 quantization of x (M, K) into x8 (M, K) and scale (M,)."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(v))
    scale = tl.div_rn(tl.max(absmax, axis=0), 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)  # a zero row quantizes to zeros
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        r = tl.div_rn(v, scale)
        # Round half to even, exactly: r = floor + frac, frac computed without rounding.
        low = tl.floor(r)
        frac = r - low
        low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
        code = tl.minimum(tl.maximum(tl.where(up, low + 1.0, low), -127.0), 127.0)
        tl.store(x8_ptr + row * stride_qm + offs, code.to(tl.int8), mask=offs < K)
    tl.store(scale_ptr + row, scale)


@triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["M", "N", "K"])
@triton.jit
def w8a8_gemm_kernel(
    x8_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] = (sum_k x8[m, k] * w[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x8_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quantize_per_token_triton(x2: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (x8 int8 (M, K), scale float32 (M,)), as the op's reference does."""
    m, k = x2.shape
    x8 = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m:
        block_k = min(QUANT_BLOCK_K, triton.next_power_of_2(k))
        quantize_rows_kernel[(m,)](x2, x8, scale, k, x2.stride(0), x8.stride(0), BLOCK_K=block_k)
    return x8, scale


@register_lowering("triton", "linear_w8a8")
def linear_w8a8_triton(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Triton implementation of fxforge::linear_w8a8 (same signature and semantics)."""
    k = x.shape[-1]
    check_w8a8_args(k, qweight, wscale, bias)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    x8, x_scale = quantize_per_token_triton(x2)
    qweight, wscale = qweight.contiguous(), wscale.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    w8a8_gemm_kernel[grid](
        x8, qweight, x_scale, wscale, bias if bias is not None else out, out,
        m, n, k, x8.stride(0), qweight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
    )
    return out.reshape(*x.shape[:-1], n)
