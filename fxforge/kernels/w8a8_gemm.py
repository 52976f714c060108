"""Triton GEMM for `fxforge::linear_w8a8`: int8 x int8 -> int32 `tl.dot` (wgmma s8 on Hopper).

Activations come from fxforge/kernels/w8a8_quantize.py. The epilogue is the reference's (and
ONNX Runtime's) float32 arithmetic, op by op:
* act_scale="token": y = (acc · wscale[n]) · s_x[m] + bias[n];
* act_scale="tensor": the codes arrive as q - 128, so acc += (128 - zp) · Σ_k W8[n, k] (summed
  from the same weight tiles) gives Σ (q - zp)·W8 exactly; y = acc · (s · wscale[n]) + bias[n].
Launched with enable_fp_fusion=False: a fused multiply-add would round once where the
reference rounds twice. Helper @triton.jit functions are avoided so `compile_for_hopper` sees
one function.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import BIT_EXACT
from fxforge.ir.ops.linear_w8a8 import check_w8a8_args
from fxforge.kernels._common import autotune_configs
from fxforge.kernels.w8a8_quantize import quantize_per_tensor_triton, quantize_per_token_triton

# First config = the interpreter's: small, so test shapes span several tiles and a K tail.
# int8 wgmma needs BLOCK_K >= 32.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]


@triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["M", "N", "K"])
@triton.jit
def w8a8_gemm_kernel(
    x8_ptr, w_ptr, x_scale_ptr, x_zp_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] = Σ_k x8[m, k]·w[n, k], rescaled per token or per tensor (see module docstring)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x8_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if not PER_TOKEN:
            w_sum += tl.sum(b.to(tl.int32), axis=0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if PER_TOKEN:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        y = (acc.to(tl.float32) * w_scale[None, :]) * x_scale[:, None]
    else:
        zero_point = tl.load(x_zp_ptr).to(tl.int32)
        acc += (128 - zero_point) * w_sum[None, :]
        y = acc.to(tl.float32) * (tl.load(x_scale_ptr) * w_scale)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@register_lowering("triton", "linear_w8a8", tolerance=BIT_EXACT)
def linear_w8a8_triton(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor],
                       act_scale: str = "tensor") -> Tensor:
    """Triton implementation of fxforge::linear_w8a8 (same signature and semantics)."""
    k = x.shape[-1]
    check_w8a8_args(k, qweight, wscale, bias, act_scale)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    if act_scale == "token":
        x8, x_scale = quantize_per_token_triton(x2)
        x_zp = x_scale  # unused by the per-token epilogue
    else:
        x8, x_scale, x_zp = quantize_per_tensor_triton(x2)
    qweight, wscale = qweight.contiguous(), wscale.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    w8a8_gemm_kernel[grid](
        x8, qweight, x_scale, x_zp, wscale, bias if bias is not None else out, out,
        m, n, k, x8.stride(0), qweight.stride(0), out.stride(0),
        PER_TOKEN=act_scale == "token", HAS_BIAS=bias is not None, enable_fp_fusion=False,
    )
    return out.reshape(*x.shape[:-1], n)
