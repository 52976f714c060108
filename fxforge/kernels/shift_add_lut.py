"""Triton lookup-table kernel for `fxforge::shift_add_linear` (ShiftAddLLM's LUT GEMV/GEMM).

For every group of 8 activations x_0..x_7 of a token, a 256-entry table holds all signed sums
T[c] = Σ_j (bit j of c ? +x_j : -x_j). A packed byte of sign bits (8 weights of one row and
plane) indexes it, so 8 multiply-adds become one lookup. Per tile:

    1. build T for BLOCK_K/8 byte groups of BLOCK_M tokens by doubling: start from the pair
       (-x_7, +x_7) and, for j = 6..0, join (T - x_j, T + x_j) — 255 adds for 256 entries,
       with bit j of the index ending up as column j's sign;
    2. for each plane p, gather T at the bytes of BLOCK_N rows and sum over the bytes:
       S_p[m, n] = x[m, block] · b_p[n, block];
    3. scale by α_p = Σ_t s_t·2^e_t. With EXPONENT_ADD (the default) each term is a shift:
       e_t is added to the exponent field of S_p's IEEE bits (an integer add), the sign s_t
       picks +, - or nothing; a zero or underflowing result is flushed to zero (as GPUs do
       with denormals) and an overflow becomes ±inf. With EXPONENT_ADD=False the term is a
       float multiply by the exact 2^e_t instead. On the target (sm_90) the multiply is
       likely the faster one: an SM issues 128 fp32 multiplies but only 64 int32 adds per
       clock (CUDA guide, arithmetic throughput for compute capability 9.0), and the exponent
       add also needs its range guard (a shift, mask, compare and select). Both stay
       selectable so bench/shift_add_gpu.py can time each; either way a scale is applied
       once per (K block, plane, term) and output, never per weight, so this is a small
       part of the work next to the table build and the lookups.

BLOCK_K divides group_size (the launcher picks it), so a K block has one scale set; the lat
layout (N, K/32, q) int32 puts the 4 bytes of a word next to each other along K. Masked
activations load as 0, so padding bits past K add ±0. Launcher: M == 1 (decoding GEMV) runs
BLOCK_M = 1; small batches run BLOCK_M up to 8 tokens sharing each weight byte's loads. The
LUT pays off while tables are reused across many rows: it targets the memory-bound
small-batch regime; large batches belong to a dequantize + tl.dot GEMM.
Helper @triton.jit functions are avoided: `compile_for_hopper` re-jits only the top-level
kernel under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED
from fxforge.ir.ops.shift_add_linear import check_args
from fxforge.kernels._common import interpreting

MAX_BLOCK_M = 8


@triton.jit
def shift_add_lut_kernel(
    x_ptr, packed_ptr, exps_ptr, signs_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    Q: tl.constexpr, TERMS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EXPONENT_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, n] = Σ_g Σ_p α[n, g, p] · Σ_{k in g} x[m, k]·b_p[n, k] (+ bias[n])."""
    KB: tl.constexpr = BLOCK_K // 8  # table groups (bytes) per K block
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, KB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    words = (K + 31) // 32
    groups = K // GROUP_SIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # 1. the table, (BLOCK_M, KB, 256), built from column 7 down to column 0
        col = k0 + offs_kb * 8  # first column of each byte group
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + col[None, :]
        x_mask = mask_m[:, None] & (col[None, :] < K)
        x7 = tl.load(x_ptrs + 7, mask=x_mask, other=0.0).to(tl.float32)
        table = tl.join(-x7, x7)  # (BLOCK_M, KB, 2): index bit 0 = sign of column 7
        for j in tl.static_range(6, -1, -1):
            xj = tl.load(x_ptrs + j, mask=x_mask, other=0.0).to(tl.float32)[:, :, None]
            table = tl.reshape(tl.join(table - xj, table + xj), (BLOCK_M, KB, 2 ** (8 - j)))
        # 2./3. per plane: look up the sign bytes, sum over the block, scale by α
        byte = k0 // 8 + offs_kb  # byte index along the row
        word_off = (byte // 4) * Q
        shift = (byte % 4) * 8
        g = k0 // GROUP_SIZE
        for p in tl.static_range(Q):
            w_ptrs = packed_ptr + offs_n[None, :] * (words * Q) + word_off[:, None] + p
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
            index = (w >> shift[:, None]) & 0xFF  # (KB, BLOCK_N)
            index = tl.broadcast_to(index[None, :, :], (BLOCK_M, KB, BLOCK_N))
            partial = tl.sum(tl.gather(table, index, 2), axis=1)  # (BLOCK_M, BLOCK_N)
            for t in tl.static_range(TERMS):
                at = ((offs_n * groups + g) * Q + p) * TERMS + t
                e = tl.load(exps_ptr + at, mask=mask_n, other=0).to(tl.int32)[None, :]
                s = tl.load(signs_ptr + at, mask=mask_n, other=0).to(tl.int32)[None, :]
                if EXPONENT_ADD:
                    raw = partial.to(tl.int32, bitcast=True)
                    biased = ((raw >> 23) & 0xFF) + e
                    shifted = (raw + (e << 23)).to(tl.float32, bitcast=True)
                    inf = tl.where(partial < 0, float("-inf"), float("inf"))
                    shifted = tl.where(biased >= 255, inf, shifted)
                    # zero, denormal or underflowing: flush to zero
                    scaled = tl.where((((raw >> 23) & 0xFF) > 0) & (biased > 0), shifted, 0.0)
                else:
                    scaled = partial * tl.exp2(e.to(tl.float32))
                acc += tl.where(s > 0, scaled, tl.where(s < 0, -scaled, 0.0))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def block_k_for(group_size: int, limit: int = 64) -> int:
    """The largest 8·2^i <= limit dividing group_size: one scale set per K block."""
    block = 8
    while block * 2 <= limit and group_size % (block * 2) == 0:
        block *= 2
    return block


@register_lowering("triton", "shift_add_linear", tolerance=FLOAT32_REORDERED)
def shift_add_linear_triton(
    x: Tensor, packed: Tensor, exps: Tensor, signs: Tensor, bias: Optional[Tensor], group_size: int,
    exponent_add: bool = True,
) -> Tensor:
    """Triton implementation of fxforge::shift_add_linear (same signature and semantics)."""
    k = x.shape[-1]
    check_args(k, packed, exps, signs, bias, group_size)
    n, _, q = packed.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 1 if m == 1 else min(MAX_BLOCK_M, triton.next_power_of_2(m))
    # the interpreter's cost is per program and op: tiles just small enough for tests to span
    # several N tiles and K blocks
    block_n = 32 if interpreting() else 64
    block_k = block_k_for(group_size, 32 if interpreting() else 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    shift_add_lut_kernel[grid](
        x2, packed.contiguous(), exps.contiguous(), signs.contiguous(), bias if bias is not None else out, out,
        m, n, k, x2.stride(0), out.stride(0),
        Q=q, TERMS=exps.shape[-1], GROUP_SIZE=group_size, HAS_BIAS=bias is not None, EXPONENT_ADD=exponent_add,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out.reshape(*x.shape[:-1], n)
