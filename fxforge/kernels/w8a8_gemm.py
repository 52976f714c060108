"""Triton GEMM for `fxforge::linear_w8a8`: int8 x int8 -> int32 `tl.dot` (wgmma s8 on Hopper).

Activations come from fxforge/kernels/w8a8_quantize.py. The epilogue is the reference's (and
ONNX Runtime's) float32 arithmetic, op by op:
* act_scale="token": y = (acc · wscale[n]) · s_x[m] + bias[n];
* act_scale="tensor": the codes arrive as q - 128, so acc += (128 - zp) · Σ_k W8[n, k] (a
  second dot of the same weight tiles with ones) gives Σ (q - zp)·W8 exactly;
  y = acc · (s · wscale[n]) + bias[n].
Launched with enable_fp_fusion=False: a fused multiply-add would round once where the
reference rounds twice. Helper @triton.jit functions are avoided so `compile_for_hopper` sees
one function.

Chosen by the number of tokens M (at decode sizes launch count, not bandwidth, set the time:
the H200 run at 00b4d69 spent ~0.18 ms per call on ~14 launches whatever the layer size):
- M <= GEMV_MAX_M (1): `w8a8_gemv_kernel`, ONE launch. Every program finds x's range, derives
  the scale (and zero point) with the reference's float32 formula and quantizes x itself (x
  is one row: re-reading it per program costs far less than a launch), then runs a CUDA-core
  int32 GEMV over a narrow block of rows (BLOCK_N = 4..16, so a 4096-row layer has 256-1024
  programs) with wide K tiles pipelined by `tl.range(num_stages=...)`, 16-byte weight loads.
  The codes enter the product as q - zp (per tensor) or q (per token): no Σ W8 correction.
- M <= SMALL_M (16): activation quantizer (one launch, see w8a8_quantize.py) + this GEMM with
  BLOCK_M = 16 configs and narrow BLOCK_N (enough programs to fill 132 SMs).
- larger M: the same body with wide wgmma tiles.
Measured on an H200 (bench/w8a8_gpu_paths.py, bench/results/w8a8_gpu_paths_NVIDIA_H200.json,
kernel time inside a CUDA graph): per tensor at 8192x8192, batch 1 0.036 ms, batch 2-16
0.030-0.031 ms, batch 128 0.059 ms (fp16 cuBLAS 0.039 / 0.033-0.039 / 0.038 ms); all outputs
equal to the op's reference run on the same GPU.
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

# Tokens up to which each path runs (see the module docstring); module constants so a bench can move them.
GEMV_MAX_M = 1
SMALL_M = 16

# First config = the interpreter's: small, so test shapes span several tiles and a K tail.
# int8 wgmma needs BLOCK_K >= 32.
# w8a8_gemv_kernel (M == 1): narrow row blocks, wide K tiles (as wq_gemv's measured H200 optimum).
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "STAGES": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "STAGES": 3}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024, "STAGES": 2}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024, "STAGES": 4}, num_warps=4, num_stages=4),
]
# BLOCK_M = 16 (tl.dot's minimum; padded rows cost no weight traffic) for 1 < M <= SMALL_M.
_SMALL_M_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=3),
]


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
    # Σ_k W8[n, k] (per-tensor only) by a second int8 dot with a tile of ones: tensor-core work
    # the memory-bound loop has to spare, where a tl.sum over the tile doubled the GEMM's time.
    ones = tl.full((16, BLOCK_K), 1, dtype=tl.int8)
    w_sums = tl.zeros((16, BLOCK_N), dtype=tl.int32)  # 16 equal rows (tl.dot's minimum M)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x8_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if not PER_TOKEN:
            w_sums = tl.dot(ones, b, w_sums, out_dtype=tl.int32)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if PER_TOKEN:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        y = (acc.to(tl.float32) * w_scale[None, :]) * x_scale[:, None]
    else:
        zero_point = tl.load(x_zp_ptr).to(tl.int32)
        w_sum = tl.max(w_sums, axis=0)
        acc += (128 - zero_point) * w_sum[None, :]
        y = acc.to(tl.float32) * (tl.load(x_scale_ptr) * w_scale)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def w8a8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, N, K, stride_wn,
    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """One token, float x (K,): quantize x (per tensor = per token here, only the formula
    differs) and out[n] = Σ_k code[k]·w[n, k], rescaled, in one launch (module docstring)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # Pass 1: x's range; starting at 0 is the reference's clamp to include 0.
    lo_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
    hi_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        lo_v = tl.minimum(lo_v, v)
        hi_v = tl.maximum(hi_v, v)
    lo = tl.min(lo_v, axis=0)
    hi = tl.max(hi_v, axis=0)
    if PER_TOKEN:
        scale = tl.div_rn(tl.maximum(-lo, hi), 127.0)  # max(-min, max) = max|x|, exactly
        scale = tl.where(scale == 0.0, 1.0, scale)
        zero_point = 0.0
    else:
        scale = tl.where(hi == lo, 1.0, tl.div_rn(hi - lo, 255.0))
        z = tl.minimum(tl.maximum(-tl.div_rn(lo, scale), 0.0), 255.0)
        z_low = tl.floor(z)
        z_frac = z - z_low
        z_low_is_odd = (z_low - 2.0 * tl.floor(z_low * 0.5)) != 0.0
        zero_point = tl.where((z_frac > 0.5) | ((z_frac == 0.5) & z_low_is_odd), z_low + 1.0, z_low)
    # Pass 2: codes (q - zp, exact small integers) times the int8 rows, summed in int32.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        v = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.div_rn(v, scale)
        low = tl.floor(r)
        frac = r - low
        low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
        code = tl.where((frac > 0.5) | ((frac == 0.5) & low_is_odd), low + 1.0, low)
        if PER_TOKEN:
            code = tl.minimum(tl.maximum(code, -127.0), 127.0)
        else:
            code = tl.minimum(tl.maximum(code + zero_point, 0.0), 255.0) - zero_point
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += w.to(tl.int32) * code.to(tl.int32)[None, :]
    dot = tl.sum(acc, axis=1).to(tl.float32)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if PER_TOKEN:
        y = (dot * w_scale) * scale
    else:
        y = dot * (scale * w_scale)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


_TUNE_KEY = ["N", "K", "PER_TOKEN", "HAS_BIAS"]
w8a8_gemv_kernel = triton.autotune(configs=autotune_configs(_GEMV_CONFIGS), key=_TUNE_KEY)(w8a8_gemv_kernel)
w8a8_small_m_kernel = triton.autotune(configs=autotune_configs(_SMALL_M_CONFIGS), key=["M", *_TUNE_KEY])(
    w8a8_gemm_kernel
)
w8a8_gemm_kernel = triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["M", *_TUNE_KEY])(w8a8_gemm_kernel)


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
    qweight, wscale = qweight.contiguous(), wscale.contiguous()
    b = bias if bias is not None else out
    if m <= GEMV_MAX_M:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        w8a8_gemv_kernel[grid](
            x2, qweight, wscale, b, out, n, k, qweight.stride(0),
            PER_TOKEN=act_scale == "token", HAS_BIAS=bias is not None, enable_fp_fusion=False,
        )
        return out.reshape(*x.shape[:-1], n)
    if act_scale == "token":
        x8, x_scale = quantize_per_token_triton(x2)
        x_zp = x_scale  # unused by the per-token epilogue
    else:
        x8, x_scale, x_zp = quantize_per_tensor_triton(x2)
    kernel = w8a8_small_m_kernel if m <= SMALL_M else w8a8_gemm_kernel
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](
        x8, qweight, x_scale, x_zp, wscale, b, out,
        m, n, k, x8.stride(0), qweight.stride(0), out.stride(0),
        PER_TOKEN=act_scale == "token", HAS_BIAS=bias is not None, enable_fp_fusion=False,
    )
    return out.reshape(*x.shape[:-1], n)
