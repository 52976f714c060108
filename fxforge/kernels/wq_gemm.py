"""Triton kernels for `fxforge::linear_wq`: the weight is dequantized inside the kernel.

Chosen by the number of tokens M in the launcher:
- `wq_gemv_kernel` (M == 1, decoding): CUDA-core GEMV, no tensor cores; the dequantized
  weight never goes through shared memory (only the packed tile, by cp.async). Narrow
  column blocks (BLOCK_N = 8..32) so a 4096-wide layer launches 128-512 programs; wide K tiles (256..1024 codes) loaded with `tl.range(num_stages=...)` so triton
  pipelines them with 16-byte cp.async although no dot consumes them (that is what keeps
  enough bytes in flight to approach memory bandwidth).
- `wq_small_m_kernel` (1 < M <= SMALL_M): `wq_linear_kernel` with BLOCK_M = 16 (tl.dot's
  minimum; padding rows are masked and cost no memory traffic) and narrow BLOCK_N.
- `wq_gemm_kernel` (M > SMALL_M): the same body with wide tensor-core (wgmma) tiles.

Why the previous kernels were slow: they addressed the packed weight as `byte[k // (8//BITS)]`
per element, which hides the contiguity from the compiler, so every code was its own scalar
byte load (twice per byte for int4); in the GEMM the (BLOCK_K, BLOCK_N) tile was loaded with
consecutive threads a whole row (K/2 bytes) apart, uncoalesced; codes went through the
quarter-rate int->float convert; and the M == 1 path needed three launches (zero fill,
split-K atomics, cast). Here the packed tile is loaded row-major as (BLOCK_N, BLOCK_K //
PER_UNIT) 32-bit words (bytes when a row is not a whole number of aligned words), 16 bytes
per thread, and unpacked with shifts in registers.

Codes become floats without an int->float conversion: `code | 0x4B000000` read as float32 is
2^23 + code, and subtracting 2^23 + zero gives code - zero exactly. When a K tile lies inside
one quantization group (GROUP_SIZE % BLOCK_K == 0) the scale is applied once per tile, after
the dot (or the per-unit partial sums in the GEMV): acc += dot(x, (q - z)ᵀ) * s, where q - z
is an integer in (-256, 256), exact in fp16, bf16 and tf32. Otherwise scales and zero points
are gathered per element (per 32-bit unit in the GEMV).

Packing: element k of row n sits in byte k // (8//BITS) at bit (k % (8//BITS)) * BITS, low
bits first (see fxforge/ir/ops/linear_wq.py); read as little-endian int32 words, code j of a
word is at bit j * BITS. Bits 2, 4 and 8 share one code path.
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
from fxforge.ir.verify import FLOAT32_REORDERED
from fxforge.ir.ops.linear_wq import check_wq_args
from fxforge.kernels._common import autotune_configs, interpreting

# Batches up to this many tokens take the small-M configs (BLOCK_M = 16); one token the GEMV.
SMALL_M = 16

# The first config of each list is the one the interpreter runs: small, so tiny test shapes
# still span several tiles and a masked K tail.
# wq_gemv_kernel (M == 1), measured on an H200 (bench/results/wq_gemv_NVIDIA_H200.json): 8-row
# blocks with 256-1024-code tiles were fastest; BLOCK_K > GROUP_SIZE gathers scales per unit.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "STAGES": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "STAGES": 3}, num_warps=2, num_stages=3),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 1024, "STAGES": 2}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_K": 256, "STAGES": 4}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "STAGES": 4}, num_warps=4, num_stages=4),
]
# wq_linear_kernel for 1 < M <= SMALL_M (and M == 1 when a unit straddles two groups).
_SMALL_M_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=2, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=6),
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
]


@triton.jit
def wq_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_gn, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    UNIT_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k//G]) * s[n, k//G] (+ bias[n]).

    qweight_ptr points at UNIT_BITS-wide units (int32 words or uint8 bytes) and stride_qn
    counts units; K is a multiple of the codes per unit.
    """
    PER_UNIT: tl.constexpr = UNIT_BITS // BITS
    BLOCK_U: tl.constexpr = BLOCK_K // PER_UNIT
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    shifts = tl.arange(0, PER_UNIT) * BITS
    units_per_row = K // PER_UNIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        offs_u = k0 // PER_UNIT + tl.arange(0, BLOCK_U)
        units = tl.load(qweight_ptr + offs_n[:, None] * stride_qn + offs_u[None, :],
                        mask=n_ok[:, None] & (offs_u < units_per_row)[None, :], other=0).to(tl.int32)
        codes = (units[:, :, None] >> shifts[None, None, :]) & CODE_MASK
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
        magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code, exactly
        if GROUP_SIZE % BLOCK_K == 0:  # the whole K tile is in one group: scale after the dot
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + offs_n * stride_gn + group, mask=n_ok, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + offs_n * stride_gn + group, mask=n_ok, other=0).to(tl.float32)
            w = magic - (zero + 8388608.0)[:, None]  # q - z, an exact small integer
            part = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)))
            acc += part * scale[None, :]
        else:
            w_mask = n_ok[:, None] & k_ok[None, :]
            group_of = offs_n[:, None] * stride_gn + offs_k[None, :] // GROUP_SIZE
            scale = tl.load(scales_ptr + group_of, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group_of, mask=w_mask, other=0).to(tl.float32)
            w = (magic - (zero + 8388608.0)) * scale
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def wq_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    N, K, K_UNITS, stride_qn, stride_gn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, UNIT_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """One token (M == 1): out[n] = sum_k x[k] * (q[n, k] - z) * s (+ bias[n]), on CUDA cores.

    No tensor cores, and the dequantized weight stays in registers: each thread takes its
    packed units (16 bytes per row and tile) and, for code j of every unit, multiplies (q - z) by x[unit * PER_UNIT + j]
    into a (BLOCK_N, units) float32 partial; the scale is applied once per unit and tile,
    and the row sums are taken once at the end. Requires GROUP_SIZE % PER_UNIT == 0 (no
    unit straddles two groups); the launcher routes other shapes to wq_linear_kernel.
    K_UNITS = K // PER_UNIT is an argument so that triton sees its divisibility (16-byte
    loads under the row mask).
    """
    PER_UNIT: tl.constexpr = UNIT_BITS // BITS
    BLOCK_U: tl.constexpr = BLOCK_K // PER_UNIT
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    # An explicit num_stages makes triton pipeline these loads (cp.async) although no dot uses them.
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_u = k0 // PER_UNIT + tl.arange(0, BLOCK_U)
        u_ok = offs_u < K_UNITS
        w_mask = n_ok[:, None] & u_ok[None, :]
        units = tl.load(qweight_ptr + offs_n[:, None] * stride_qn + offs_u[None, :], mask=w_mask, other=0).to(tl.int32)
        if GROUP_SIZE % BLOCK_K == 0:  # one group per tile: one scale and zero per row
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + offs_n * stride_gn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(zeros_ptr + offs_n * stride_gn + group, mask=n_ok, other=0).to(tl.float32)[:, None]
        else:  # per unit (a unit lies inside one group)
            group_of = offs_n[:, None] * stride_gn + (offs_u * PER_UNIT // GROUP_SIZE)[None, :]
            scale = tl.load(scales_ptr + group_of, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group_of, mask=w_mask, other=0).to(tl.float32)
        zero = zero + 8388608.0
        part = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
        for j in tl.static_range(PER_UNIT):
            xj = tl.load(x_ptr + offs_u * PER_UNIT + j, mask=u_ok, other=0.0).to(tl.float32)
            # (2^23 + code) - (2^23 + zero) = code - zero, exactly, without an int->float convert
            w = (((units >> (j * BITS)) & CODE_MASK) | 0x4B000000).to(tl.float32, bitcast=True) - zero
            part += w * xj[None, :]
        acc += part * scale
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


wq_gemv_kernel = triton.autotune(configs=autotune_configs(_GEMV_CONFIGS), key=["N", "K", "BITS", "GROUP_SIZE"])(
    wq_gemv_kernel
)
wq_small_m_kernel = triton.autotune(configs=autotune_configs(_SMALL_M_CONFIGS), key=["M", "N", "K", "BITS", "GROUP_SIZE"])(
    wq_linear_kernel
)
wq_gemm_kernel = triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["M", "N", "K", "BITS", "GROUP_SIZE"])(
    wq_linear_kernel
)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """tl.dot operand type: the activation's 16-bit type; float32 (tf32 on GPU) for float32.

    bf16 runs as float32 under the interpreter, which computes bf16 wrongly.
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def _as_units(qweight: Tensor) -> tuple[Tensor, int]:
    """The packed weight as int32 words when each row is a whole number of aligned words, else bytes."""
    if qweight.shape[1] % 4 == 0 and qweight.storage_offset() % 4 == 0 and qweight.data_ptr() % 4 == 0:
        return qweight.view(torch.int32), 32
    return qweight, 8


@register_lowering("triton", "linear_wq", tolerance=FLOAT32_REORDERED)
def linear_wq_triton(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int
) -> Tensor:
    """Triton implementation of fxforge::linear_wq (same signature and semantics)."""
    k = x.shape[-1]
    check_wq_args(k, qweight, scales, zeros, bias, bits, group_size)
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    units, unit_bits = _as_units(qweight.contiguous())
    scales, zeros = scales.contiguous(), zeros.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else out
    if m == 1 and group_size % (unit_bits // bits) == 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        wq_gemv_kernel[grid](
            x2, units, scales, zeros, b, out, n, k, k * bits // unit_bits, units.stride(0), scales.stride(0),
            BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, UNIT_BITS=unit_bits,
        )
        return out.reshape(*x.shape[:-1], n)
    kernel = wq_small_m_kernel if m <= SMALL_M else wq_gemm_kernel
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](
        x2, units, scales, zeros, b, out,
        m, n, k, x2.stride(0), units.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(x.dtype),
        UNIT_BITS=unit_bits,
    )
    return out.reshape(*x.shape[:-1], n)
