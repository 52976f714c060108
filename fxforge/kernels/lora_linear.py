"""Triton kernel for fxforge::lora_linear: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ in one launch.

Each program owns a (BLOCK_M, BLOCK_N) output tile. One pass over K loads each x tile once and
feeds it to two dots: the base product with W's tile and the bottleneck h = x·Aᵀ (BLOCK_M, R).
After the loop the low-rank branch is one more dot, h·B_tileᵀ, added to the accumulator before
the bias, so the adapter never costs a second pass over x or a round trip of h through memory.
h is recomputed by every N tile; that is R/BLOCK_N extra work (a few percent for r ≤ 16 at
BLOCK_N = 128), cheaper than a second launch. The rank is padded to R ≥ 16 (tl.dot's minimum)
with masked loads. Dots run in the activation's 16-bit type (float32/tf32 for float32 inputs)
with float32 accumulation; bf16 is computed as float32 under the interpreter, which gets bf16 wrong.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED
from fxforge.ir.ops.lora_linear import check_lora_args
from fxforge.kernels._common import autotune_configs, interpreting

_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["M", "N", "K", "RANK"])
@triton.jit
def lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, scale,
    M, N, K, RANK,
    stride_xm, stride_wn, stride_am, stride_bn, stride_om,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < RANK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        # W and A tiles loaded transposed, (BLOCK_K, BLOCK_N) and (BLOCK_K, R), ready for x·tile
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                    other=0.0).to(DOT_DTYPE)
        a = tl.load(a_ptr + offs_r[None, :] * stride_am + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None],
                    other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, w, acc)
        h = tl.dot(x, a, h)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None],
                other=0.0).to(DOT_DTYPE)  # Bᵀ tile (R, BLOCK_N)
    # h is rounded to the dot type like any activation; the branch is scaled in float32
    acc += tl.dot(h.to(DOT_DTYPE), b) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def padded_rank(rank: int) -> int:
    """The rank rounded up to a power of two >= 16, the smallest tl.dot dimension."""
    return max(16, triton.next_power_of_2(rank))


@register_lowering("triton", "lora_linear", tolerance=FLOAT32_REORDERED)
def lora_linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                       scale: float) -> Tensor:
    """Triton implementation of fxforge::lora_linear (same signature and semantics)."""
    check_lora_args(x, weight, bias, lora_a, lora_b)
    n, k = weight.shape
    rank = lora_a.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    w, a, b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
    bias_arg = bias.contiguous() if bias is not None else out  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    lora_linear_kernel[grid](
        x2, w, bias_arg, a, b, out, float(scale),
        m, n, k, rank,
        x2.stride(0), w.stride(0), a.stride(0), b.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(x.dtype), R=padded_rank(rank),
    )
    return out.reshape(*x.shape[:-1], n)
