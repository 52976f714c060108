"""Triton activation quantizers for `fxforge::linear_w8a8`, bit-identical to the op's reference.

1. `quantize_rows_kernel` (act_scale="token"): one program per token; pass 1 finds max|x|,
   pass 2 writes x8 = clamp(round_half_even(x / s), -127, 127) with s = max|x|/127 (1 for a
   zero row) and stores s.
2. act_scale="tensor": q = clamp(round_half_even(x / s) + zp, 0, 255), stored as q - 128 in
   int8 (the GEMM's int8 tl.dot takes it and adds (128 - zp)·Σ_k W8 back), with the tensor's
   (s, zp) computed on device by `per_tensor_params`' float32 formula, op by op:
   lo = min(min x, 0), hi = max(max x, 0), s = (hi - lo)/255 (1 when hi == lo),
   zp = round(clamp(-(lo/s), 0, 255)). Min and max are exact in any order, so splitting the
   reduction over programs changes nothing. Launches (each costs more than these kernels run
   at decode sizes; the torch version of the scalar math was ~12 launches):
   - numel <= SINGLE_PROGRAM_MAX_NUMEL: `quantize_tensor_kernel` alone, one program, FUSED_RANGE
     (it finds lo/hi itself, then quantizes);
   - larger: `tensor_range_kernel` writes one (lo, hi) per chunk, then `quantize_tensor_kernel`
     reduces those partials in every program and quantizes its own chunk.
Both divide with `tl.div_rn` (IEEE rounded, not the approximate GPU divide) and round by hand
(libdevice.rint is missing under the interpreter). Helper @triton.jit functions are avoided so
`compile_for_hopper` sees one function, hence the rounding lines repeat.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

QUANT_BLOCK_K = 1024
TENSOR_BLOCK = 1024
# Up to this many elements one program finds the range and quantizes (H200, CUDA graph: as fast
# as the split below at 8192, 2.5x slower at 64K: one SM is compute-bound on the divisions).
SINGLE_PROGRAM_MAX_NUMEL = 8192
# Larger tensors: chunks of at least this many elements, and at most MAX_RANGES of them, so
# every quantize program's re-reduction of the partials stays small.
MIN_CHUNK = 8192
MAX_RANGES = 1024


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
def tensor_range_kernel(x_ptr, lo_ptr, hi_ptr, numel, per_program, BLOCK: tl.constexpr):
    """Partial range of a contiguous x: lo[p] = min(x chunk p, 0), hi[p] = max(x chunk p, 0)."""
    pid = tl.program_id(0)
    start = pid * per_program
    end = tl.minimum(start + per_program, numel)
    lo = tl.zeros((BLOCK,), dtype=tl.float32)  # starting at 0 = the reference's clamp to include 0
    hi = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, v)
        hi = tl.maximum(hi, v)
    tl.store(lo_ptr + pid, tl.min(lo, axis=0))
    tl.store(hi_ptr + pid, tl.max(hi, axis=0))


@triton.jit
def quantize_tensor_kernel(
    x_ptr, a8_ptr, lo_ptr, hi_ptr, scale_ptr, zp_ptr, numel, num_ranges, per_program,
    FUSED_RANGE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """a8 = clamp(round_half_even(x / s) + zp, 0, 255) - 128 (int8) over a contiguous x.

    (s, zp) from x's range: found here over all of x (FUSED_RANGE; launch one program) or
    reduced from tensor_range_kernel's num_ranges partials. Program 0 stores s and zp.
    """
    pid = tl.program_id(0)
    if FUSED_RANGE:
        lo_v = tl.zeros((BLOCK,), dtype=tl.float32)
        hi_v = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, numel, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
            lo_v = tl.minimum(lo_v, v)
            hi_v = tl.maximum(hi_v, v)
        lo = tl.min(lo_v, axis=0)
        hi = tl.max(hi_v, axis=0)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        lo = tl.min(tl.load(lo_ptr + offs_r, mask=offs_r < num_ranges, other=0.0), axis=0)
        hi = tl.max(tl.load(hi_ptr + offs_r, mask=offs_r < num_ranges, other=0.0), axis=0)
    scale = tl.where(hi == lo, 1.0, tl.div_rn(hi - lo, 255.0))
    z = tl.minimum(tl.maximum(-tl.div_rn(lo, scale), 0.0), 255.0)
    z_low = tl.floor(z)
    z_frac = z - z_low
    z_low_is_odd = (z_low - 2.0 * tl.floor(z_low * 0.5)) != 0.0
    zero_point = tl.where((z_frac > 0.5) | ((z_frac == 0.5) & z_low_is_odd), z_low + 1.0, z_low)
    start = pid * per_program
    end = tl.minimum(start + per_program, numel)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        ok = offs < end
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.div_rn(v, scale)
        low = tl.floor(r)
        frac = r - low
        low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
        code = tl.minimum(tl.maximum(tl.where(up, low + 1.0, low) + zero_point, 0.0), 255.0)
        tl.store(a8_ptr + offs, (code - 128.0).to(tl.int8), mask=ok)
    if pid == 0:
        tl.store(scale_ptr, scale)
        tl.store(zp_ptr, zero_point)


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
    """Non-empty contiguous x (M, K) -> (q - 128 as int8 (M, K), scale, zero point): 0-d float32 tensors.

    Two launches at most (one up to SINGLE_PROGRAM_MAX_NUMEL elements) and no host sync.
    """
    a8 = torch.empty(x2.shape, dtype=torch.int8, device=x2.device)
    params = torch.empty((2,), dtype=torch.float32, device=x2.device)  # (scale, zero point)
    scale, zero_point = params[0], params[1]
    numel = x2.numel()
    if numel <= SINGLE_PROGRAM_MAX_NUMEL:
        quantize_tensor_kernel[(1,)](x2, a8, params, params, scale, zero_point, numel, 1, numel,
                                     FUSED_RANGE=True, BLOCK=TENSOR_BLOCK, BLOCK_R=1)
        return a8, scale, zero_point
    chunk = max(MIN_CHUNK, triton.cdiv(numel, MAX_RANGES))
    chunk = triton.cdiv(chunk, TENSOR_BLOCK) * TENSOR_BLOCK
    num_ranges = triton.cdiv(numel, chunk)
    ranges = torch.empty((2, num_ranges), dtype=torch.float32, device=x2.device)
    tensor_range_kernel[(num_ranges,)](x2, ranges[0], ranges[1], numel, chunk, BLOCK=TENSOR_BLOCK)
    quantize_tensor_kernel[(num_ranges,)](x2, a8, ranges[0], ranges[1], scale, zero_point, numel, num_ranges, chunk,
                                          FUSED_RANGE=False, BLOCK=TENSOR_BLOCK,
                                          BLOCK_R=triton.next_power_of_2(num_ranges))
    return a8, scale, zero_point
