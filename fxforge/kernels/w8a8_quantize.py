"""Triton activation quantizers for `fxforge::linear_w8a8`, bit-identical to the op's reference.

1. `quantize_rows_kernel` (act_scale="token"): one program per token; pass 1 finds max|x|,
   pass 2 writes x8 = clamp(round_half_even(x / s), -127, 127) with s = max|x|/127 (1 for a
   zero row) and stores s.
2. `quantize_tensor_kernel` (act_scale="tensor"): elementwise q = clamp(round_half_even(x / s)
   + zp, 0, 255) with the tensor's (s, zp) read from device memory (computed by
   `per_tensor_params`, the reference's own torch code, so no host sync), stored as q - 128 in
   int8: the GEMM's int8 tl.dot takes it and adds (128 - zp)·Σ_k W8 back.
Both divide with `tl.div_rn` (IEEE rounded, not the approximate GPU divide) and round by hand
(libdevice.rint is missing under the interpreter). Helper @triton.jit functions are avoided so
`compile_for_hopper` sees one function, hence the rounding lines appear twice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops.linear_w8a8 import per_tensor_params

QUANT_BLOCK_K = 1024
TENSOR_BLOCK = 1024


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


@triton.jit
def quantize_tensor_kernel(x_ptr, a8_ptr, scale_ptr, zp_ptr, numel, BLOCK: tl.constexpr):
    """a8 = clamp(round_half_even(x / s) + zp, 0, 255) - 128 (int8) over a contiguous x."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    scale = tl.load(scale_ptr)
    zero_point = tl.load(zp_ptr)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.div_rn(v, scale)
    low = tl.floor(r)
    frac = r - low
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    code = tl.minimum(tl.maximum(tl.where(up, low + 1.0, low) + zero_point, 0.0), 255.0)
    tl.store(a8_ptr + offs, (code - 128.0).to(tl.int8), mask=ok)


def quantize_per_token_triton(x2: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (x8 int8 (M, K), scale float32 (M,)), as the op's reference does."""
    m, k = x2.shape
    x8 = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m:
        block_k = min(QUANT_BLOCK_K, triton.next_power_of_2(k))
        quantize_rows_kernel[(m,)](x2, x8, scale, k, x2.stride(0), x8.stride(0), BLOCK_K=block_k)
    return x8, scale


def quantize_per_tensor_triton(x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Non-empty contiguous x (M, K) -> (q - 128 as int8 (M, K), scale, zero point): 0-d float32 tensors."""
    scale, zero_point = per_tensor_params(x2.to(torch.float32))  # two reductions + scalar math, on device
    a8 = torch.empty(x2.shape, dtype=torch.int8, device=x2.device)
    numel = x2.numel()
    quantize_tensor_kernel[(triton.cdiv(numel, TENSOR_BLOCK),)](x2, a8, scale, zero_point, numel, BLOCK=TENSOR_BLOCK)
    return a8, scale, zero_point
