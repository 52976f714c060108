"""Flash-attention forward kernel and the `triton` lowering of `fxforge::attention`.

One program computes a BLOCK_M tile of queries for one (batch, query head) against all the
keys it may see, BLOCK_N keys at a time, with the online softmax of FlashAttention (running
row max m, running sum l, fp32 accumulator rescaled by exp(m_old - m_new)); the full score
matrix never exists. Scores are kept in the log2 domain (scale·log2 e folded into one
multiply) so the exponential is exp2.

- GQA: the program for query head h reads key/value head h // num_kv_groups; K/V are never
  repeated in memory.
- Causal (query i sees key j <= i + Lk - Lq, see `fxforge/ir/ops/attention.py`): key blocks
  past the diagonal are never visited; blocks wholly below it run without the triangle test,
  only the blocks that straddle it apply it.
- Masks: bool (True = attend) or additive, loaded per tile through four strides, so a mask
  broadcast over batch or heads is read with stride 0 and never materialized.
- Any sequence length (bounds masks) and any head dim up to 256 (padded to a power of two,
  at least 16, for tl.dot).

`attention_triton` is the launcher with the op's signature; it sends single-query calls
(decoding) to the split-KV kernel in `decode_attention.py`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops import register_lowering
from fxforge.ir.ops.attention import check_attention_inputs, default_scale, fold_bias
from fxforge.kernels._common import autotune_configs
from fxforge.kernels.attention_tiles import LOG2E, head_block, kernel_flags, online_softmax_tile, prepare_mask
from fxforge.kernels.decode_attention import decode_attention

_FORWARD_CONFIGS = [
    # The first config is the one the CPU interpreter runs: small enough that short test
    # sequences still span several key blocks (so block skipping is exercised).
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
]


@triton.autotune(
    configs=autotune_configs(_FORWARD_CONFIGS),
    # seq_bucket (next power of two of the longest length) instead of the exact lengths, so
    # prompts of many different lengths do not each trigger a new tuning run.
    key=["seq_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND"],
)
@triton.jit
def flash_attention_fwd_kernel(
    Q, K, V, Mask, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, num_kv_groups, Lq, Lk, seq_bucket, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * Hq): out[b, h, m-tile] = softmax(q·kᵀ·scale + mask)·v."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // num_kv_groups

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + kv_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = Mask + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    causal_offset = Lk - Lq
    whole_blocks_end = (Lk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # Keys < keys_end may be seen by some row of this tile; keys < full_end by every row.
        keys_end = tl.maximum(tl.minimum(Lk, (pid_m + 1) * BLOCK_M + causal_offset), 0)
        first_row_sees = tl.maximum(pid_m * BLOCK_M + causal_offset + 1, 0)
        full_end = tl.minimum((first_row_sees // BLOCK_N) * BLOCK_N, whole_blocks_end)
    else:
        keys_end = Lk
        full_end = whole_blocks_end

    # Blocks every row sees in full: no triangle test, no key bounds.
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q,
            k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, mask_ptrs + start_n * stride_mn,
            offs_m, start_n + offs_n, rows_ok, keys_end, causal_offset, qk_scale_log2, d_ok, dv_ok,
            MASK_KIND, False, False, UPCAST, PRECISION,
        )
    # The diagonal and the ragged last block: triangle and bounds applied.
    for start_n in range(full_end, keys_end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q,
            k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, mask_ptrs + start_n * stride_mn,
            offs_m, start_n + offs_n, rows_ok, keys_end, causal_offset, qk_scale_log2, d_ok, dv_ok,
            MASK_KIND, IS_CAUSAL, True, UPCAST, PRECISION,
        )

    # Rows that saw no key at all have l = 0 and acc = 0: they output 0, like torch SDPA.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & dv_ok[None, :])


def flash_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None, num_kv_groups: int
) -> Tensor:
    """Run the flash-attention forward kernel (any Lq); inputs already validated."""
    batch, num_heads, lq, head_dim = q.shape
    lk, head_dim_v = k.shape[2], v.shape[3]
    out = torch.empty((batch, num_heads, lq, head_dim_v), dtype=q.dtype, device=q.device)
    mask, mask_kind = prepare_mask(attn_mask, (batch, num_heads, lq, lk))
    mask_arg = mask if mask is not None else q  # never read when MASK_KIND == NO_MASK
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    qk_scale_log2 = default_scale(head_dim, scale) * LOG2E

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), batch * num_heads)

    flash_attention_fwd_kernel[grid](
        q, k, v, mask_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        num_heads, num_kv_groups, lq, lk, triton.next_power_of_2(max(lq, lk)), qk_scale_log2,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=head_block(head_dim), BLOCK_DV=head_block(head_dim_v),
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, **kernel_flags(q),
    )
    return out


@register_lowering("triton", "attention")
def attention_triton(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None, num_kv_groups: int,
    bias: Tensor | None = None,
) -> Tensor:
    """`fxforge::attention` on Triton: split-KV decoding when Lq == 1, flash attention otherwise.

    With one query, causal is a no-op under the op's bottom-right convention (the query is
    the last position and sees every key), so the decode kernel ignores it.
    """
    check_attention_inputs(q, k, v, attn_mask, num_kv_groups, bias)
    attn_mask = fold_bias(attn_mask, bias)  # the kernels read one additive mask; a bias is one
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fxforge Triton attention supports fp16, bf16 and fp32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"fxforge Triton attention needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 1:
        return decode_attention(q, k, v, attn_mask, scale, num_kv_groups)
    return flash_attention_forward(q, k, v, attn_mask, is_causal, scale, num_kv_groups)


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, is_causal: bool) -> float:
    """Matmul FLOPs of one forward (2 GEMMs of 2·Lq·Lk·D each), halved for a square causal mask."""
    flops = 4.0 * batch * heads * lq * lk * head_dim
    return flops / 2 if is_causal and lq == lk else flops


__all__ = ["attention_triton", "flash_attention_forward", "flash_attention_fwd_kernel", "attention_flops"]
