"""Pieces the flash-attention and split-KV decode kernels share: the online-softmax tile step,
the mask layout, head-dim padding and dtype flags. A module of its own so that neither kernel
imports the other's private parts (`flash_attention.py` dispatches to `decode_attention.py`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.kernels._common import interpreting

__all__ = ["LOG2E", "MAX_HEAD_DIM", "NO_MASK", "ADDITIVE_MASK", "BOOL_MASK", "online_softmax_tile", "kernel_flags",
           "head_block", "prepare_mask"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Mask kinds, passed as a constexpr so each variant compiles without dead branches.
NO_MASK, ADDITIVE_MASK, BOOL_MASK = 0, 1, 2


@triton.jit
def online_softmax_tile(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, rows_ok, keys_end, causal_offset,
    qk_scale_log2, d_ok, dv_ok,
    MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, CHECK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One BLOCK_N step of the online softmax: fold keys offs_n into (acc, m_i, l_i)."""
    keys_ok = offs_n < keys_end
    k = tl.load(k_ptrs, mask=d_ok[:, None] & keys_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale_log2
    if MASK_KIND == 1:
        bias = tl.load(mask_ptrs, mask=rows_ok[:, None] & keys_ok[None, :], other=0.0).to(tl.float32)
        s += bias * 1.4426950408889634
    if MASK_KIND == 2:
        allowed = tl.load(mask_ptrs, mask=rows_ok[:, None] & keys_ok[None, :], other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    if CHECK_KEYS:
        s = tl.where(keys_ok[None, :], s, float("-inf"))
    if APPLY_CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
    # exp2(-inf - -inf) = NaN out and its probabilities at exactly 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=keys_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


def kernel_flags(q: Tensor) -> dict:
    """Constexprs that depend on the dtype: upcast bf16 under the interpreter, exact fp32 dots."""
    return {
        "UPCAST": interpreting() and q.dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products (not tf32) so results match the reference.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def head_block(dim: int) -> int:
    """tl.dot needs power-of-two tiles of at least 16: pad the head dim to one."""
    if dim > MAX_HEAD_DIM:
        raise ValueError(
            f"fxforge Triton attention supports head_dim up to {MAX_HEAD_DIM}, got {dim}; "
            f"use the eager or onnx backend for this model."
        )
    return max(16, triton.next_power_of_2(dim))


def prepare_mask(attn_mask: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[Tensor | None, int]:
    """(mask broadcast to `shape` as a stride-0 view, mask kind); bool masks viewed as uint8."""
    if attn_mask is None:
        return None, NO_MASK
    expanded = attn_mask.expand(shape)
    if attn_mask.dtype == torch.bool:
        return expanded.view(torch.uint8), BOOL_MASK
    return expanded, ADDITIVE_MASK
