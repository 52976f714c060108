"""Triton kernels for `fxforge::linear_wq`: the weight is dequantized inside the kernel.

Two kernels, chosen by the number of tokens M in the launcher:
- `wq_gemm_kernel` (M > 1): tiles of x (BLOCK_M, BLOCK_K) and of the packed weight, which is
  unpacked and dequantized in registers to (BLOCK_K, BLOCK_N) and fed to `tl.dot` in the
  activation's 16-bit type with a float32 accumulator. Weight bytes are read once per tile,
  never written back dequantized: memory traffic is the packed size.
- `wq_gemv_kernel` (M == 1, decoding): one token cannot fill a tensor-core tile, and with N
  alone the grid is too small to keep an H100 busy, so K is split across SPLIT_K programs
  (split-K); each reduces its slice with a multiply and row sum and adds it into a float32
  output with `tl.atomic_add`.

Packing: element k of row n sits in byte k // (8//BITS) at bit (k % (8//BITS)) * BITS, low
bits first (see fxforge/ir/ops/linear_wq.py). Bits 2, 4 and 8 share one code path.
Scales and zero points are loaded once per tile when BLOCK_K divides the group size (the
common case: power-of-two groups), otherwise gathered per element.
Helper @triton.jit functions are avoided on purpose: `compile_for_hopper` re-jits only the
top-level kernel under TRITON_INTERPRET=1, so nested jitted helpers would not compile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.ops.linear_wq import check_wq_args
from fxforge.kernels._common import autotune_configs, interpreting

# The first config is the one the interpreter runs: small, so tiny test shapes still span
# several tiles and a masked K tail.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 16}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["M", "N", "K"])
@triton.jit
def wq_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_gn, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k//G]) * s[n, k//G] (+ bias[n])."""
    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        # (BLOCK_K, BLOCK_N) codes: each byte is loaded PER_BYTE times (cache hits) and shifted.
        w_mask = k_ok[:, None] & n_ok[None, :]
        packed = tl.load(qweight_ptr + offs_n[None, :] * stride_qn + offs_k[:, None] // PER_BYTE, mask=w_mask, other=0)
        codes = (packed.to(tl.int32) >> ((offs_k[:, None] % PER_BYTE) * BITS)) & CODE_MASK
        if GROUP_SIZE % BLOCK_K == 0:  # the whole K tile is in one group: one scale per column
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + offs_n * stride_gn + group, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + offs_n * stride_gn + group, mask=n_ok, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]
        else:
            group_of = offs_n[None, :] * stride_gn + offs_k[:, None] // GROUP_SIZE
            scale = tl.load(scales_ptr + group_of, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group_of, mask=w_mask, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero) * scale
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=autotune_configs(_GEMV_CONFIGS), key=["N", "K"], reset_to_zero=["out_ptr"])
@triton.jit
def wq_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    N, K, stride_qn, stride_gn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Split-K GEMV: program (n-block, s) adds its K slice's partial sums into out (float32)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # Slices are whole K tiles, so a tile never straddles two programs' slices.
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)  # so every tile below starts inside K
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w_mask = n_ok[:, None] & k_ok[None, :]
        packed = tl.load(qweight_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] // PER_BYTE, mask=w_mask, other=0)
        codes = (packed.to(tl.int32) >> ((offs_k[None, :] % PER_BYTE) * BITS)) & CODE_MASK
        if GROUP_SIZE % BLOCK_K == 0:
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + offs_n * stride_gn + group, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + offs_n * stride_gn + group, mask=n_ok, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero[:, None]) * scale[:, None]
        else:
            group_of = offs_n[:, None] * stride_gn + offs_k[None, :] // GROUP_SIZE
            scale = tl.load(scales_ptr + group_of, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group_of, mask=w_mask, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero) * scale
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:  # added once, by the first slice
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    tl.atomic_add(out_ptr + offs_n, acc, mask=n_ok)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """tl.dot operand type: the activation's 16-bit type; float32 (tf32 on GPU) for float32.

    bf16 runs as float32 under the interpreter, which computes bf16 wrongly.
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


@register_lowering("triton", "linear_wq")
def linear_wq_triton(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int
) -> Tensor:
    """Triton implementation of fxforge::linear_wq (same signature and semantics)."""
    k = x.shape[-1]
    check_wq_args(k, qweight, scales, zeros, bias, bits, group_size)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    has_bias = bias is not None
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if m == 1:
        out32 = torch.zeros((1, n), dtype=torch.float32, device=x.device)  # atomics accumulate into it
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        wq_gemv_kernel[grid](
            x2, qweight, scales, zeros, bias if has_bias else out32, out32,
            n, k, qweight.stride(0), scales.stride(0),
            BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=has_bias,
        )
        out = out32.to(x.dtype)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        wq_gemm_kernel[grid](
            x2, qweight, scales, zeros, bias if has_bias else out, out,
            m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=has_bias, DOT_DTYPE=_dot_dtype(x.dtype),
        )
    return out.reshape(*x.shape[:-1], n)
