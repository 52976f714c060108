"""Split-KV decode attention: one query per head against a long KV cache.

With Lq == 1 the flash kernel would run one program per (batch, head) and leave most of a
GPU idle while each program walks the whole cache. Here the keys are cut into
`num_splits` chunks (flash-decoding):

1. `decode_split_kernel`, grid (B * Hkv, num_splits): a program takes one key/value head, all
   the query heads of its GQA group (padded to 16 rows so tl.dot applies, and so K/V are read
   once per group, not once per query head) and one chunk of keys. It writes its partial
   online-softmax state: the row max m (log2 domain), the sum l and the unnormalized
   accumulator.
2. `decode_combine_kernel`, grid (B * Hq,): rescales each chunk by exp2(m_chunk - max m) and
   normalizes: out = Σ acc_c·w_c / Σ l_c·w_c.

Chunks that see no key (all masked) carry m = -inf, l = 0 and drop out of the sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxforge.ir.ops.attention import default_scale
from fxforge.kernels._common import autotune_configs, interpreting
from fxforge.kernels.attention_tiles import LOG2E, head_block, kernel_flags, online_softmax_tile, prepare_mask

DECODE_BLOCK_N = 64
# Enough programs to fill an H100 (132 SMs) about twice over; fewer under the interpreter,
# where every program costs CPU time but several chunks are still exercised.
TARGET_PROGRAMS = 264
MAX_SPLITS = 128

_SPLIT_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=8, num_stages=3),
    triton.Config({}, num_warps=2, num_stages=2),
]


@triton.autotune(configs=autotune_configs(_SPLIT_CONFIGS), key=["keys_per_split", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_G", "MASK_KIND"])
@triton.jit
def decode_split_kernel(
    Q, K, V, Mask, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mn,
    num_kv_heads, num_kv_groups, num_splits, Lk, keys_per_split, qk_scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial attention of one GQA group's queries over keys [split·keys_per_split, +keys_per_split)."""
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bkv // num_kv_heads
    kv_h = pid_bkv % num_kv_heads

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_g < num_kv_groups
    heads = kv_h * num_kv_groups + offs_g
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=rows_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, Lk)
    k_ptrs = K + b * stride_kb + kv_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = Mask + b * stride_mb + heads[:, None] * stride_mh + offs_n[None, :] * stride_mn

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q,
            k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, mask_ptrs + start_n * stride_mn,
            offs_g, start_n + offs_n, rows_ok, end, 0, qk_scale_log2, d_ok, dv_ok,
            MASK_KIND, False, True, UPCAST, PRECISION,
        )

    # Partial buffers are contiguous (B, Hq, num_splits[, Dv]); row index = (b·Hq + head)·S + split.
    part_rows = (b * num_kv_heads * num_kv_groups + heads) * num_splits + split
    tl.store(PartM + part_rows, m_i, mask=rows_ok)
    tl.store(PartL + part_rows, l_i, mask=rows_ok)
    tl.store(
        PartAcc + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], acc, mask=rows_ok[:, None] & dv_ok[None, :]
    )


@triton.jit
def decode_combine_kernel(
    PartAcc, PartM, PartL, Out,
    stride_ob, stride_oh, stride_od,
    num_heads, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[b, h] = Σ_c acc_c·2^(m_c - M) / Σ_c l_c·2^(m_c - M), M = max_c m_c."""
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    splits_ok = offs_s < num_splits
    dv_ok = offs_dv < HEAD_DIM_V

    m = tl.load(PartM + pid * num_splits + offs_s, mask=splits_ok, other=float("-inf"))
    l = tl.load(PartL + pid * num_splits + offs_s, mask=splits_ok, other=0.0)
    acc = tl.load(
        PartAcc + (pid * num_splits + offs_s[:, None]) * HEAD_DIM_V + offs_dv[None, :],
        mask=splits_ok[:, None] & dv_ok[None, :], other=0.0,
    )
    m_max = tl.max(m, 0)
    weights = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    numerator = tl.sum(acc * weights[:, None], 0)
    denominator = tl.sum(l * weights, 0)
    out = numerator / tl.where(denominator == 0.0, 1.0, denominator)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv * stride_od, out.to(Out.dtype.element_ty), mask=dv_ok)


def choose_num_splits(batch: int, kv_heads: int, lk: int) -> int:
    """Chunks per (batch, kv head) so that about TARGET_PROGRAMS programs run, each ≥ 1 key block."""
    key_blocks = triton.cdiv(lk, DECODE_BLOCK_N)
    target = 8 if interpreting() else TARGET_PROGRAMS
    return max(1, min(key_blocks, MAX_SPLITS, triton.cdiv(target, batch * kv_heads)))


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None, num_kv_groups: int,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of a single query position (q: (B, Hq, 1, D)) by split-KV; inputs already validated."""
    batch, num_heads, lq, head_dim = q.shape
    if lq != 1:
        raise ValueError(f"decode_attention takes one query position, got Lq={lq}; use flash_attention_forward")
    kv_heads, lk, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, lk)
    keys_per_split = triton.cdiv(triton.cdiv(lk, num_splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    num_splits = triton.cdiv(lk, keys_per_split)  # rounding up the chunk may leave fewer

    mask, mask_kind = prepare_mask(attn_mask, (batch, num_heads, 1, lk))
    mask_arg = mask if mask is not None else q
    mask_strides = (mask.stride(0), mask.stride(1), mask.stride(3)) if mask is not None else (0, 0, 0)
    part_acc = torch.empty((batch, num_heads, num_splits, head_dim_v), dtype=torch.float32, device=q.device)
    part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty((batch, num_heads, 1, head_dim_v), dtype=q.dtype, device=q.device)

    decode_split_kernel[(batch * kv_heads, num_splits)](
        q, k, v, mask_arg, part_acc, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(), *mask_strides,
        kv_heads, num_kv_groups, num_splits, lk, keys_per_split, default_scale(head_dim, scale) * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=head_block(head_dim), BLOCK_DV=head_block(head_dim_v),
        BLOCK_G=max(16, triton.next_power_of_2(num_kv_groups)), BLOCK_N=DECODE_BLOCK_N, MASK_KIND=mask_kind,
        **kernel_flags(q),
    )
    decode_combine_kernel[(batch * num_heads,)](
        part_acc, part_m, part_l, out,
        out.stride(0), out.stride(1), out.stride(3),
        num_heads, num_splits,
        HEAD_DIM_V=head_dim_v, BLOCK_DV=head_block(head_dim_v), BLOCK_S=triton.next_power_of_2(num_splits),
    )
    return out
