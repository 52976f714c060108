"""`fxforge::attention(q, k, v, attn_mask, is_causal, scale, num_kv_groups, bias=None)`: fused attention.

Emitted by the `fuse_attention` pass for every spelling of softmax(Q·Kᵀ·scale + mask)·V it
matches; lowered to flash-attention Triton kernels (`fxforge/kernels/flash_attention.py`) and
to the ONNX `Attention` operator (`fxforge/backends/onnx/lowerings/attention.py`).

Semantics (those of `torch.nn.functional.scaled_dot_product_attention`, made explicit):

- q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); Hq == Hkv * num_kv_groups.
  Query head h attends with key/value head h // num_kv_groups (grouped-query attention).
- attn_mask: None; a bool mask (True = may attend); or an additive float mask of q's dtype.
  Either broadcasts to (B, Hq, Lq, Lk).
- is_causal: query i sees key j iff j <= i + (Lk - Lq). For Lq == Lk this is torch SDPA's
  top-left triangle (j <= i); for Lq < Lk (decoding against a KV cache, the new queries are
  the *last* Lq positions) it is aligned to the bottom right, which is what cached decoding
  needs and what torch SDPA's own `is_causal` does *not* do (it stays top-left).
  is_causal and attn_mask may be given together: a key must pass both.
- scale: None means 1/sqrt(D).
- bias: None, or an additive position bias of q's dtype broadcasting to (B, Hq, Lq, Lk)
  (ALiBi, relative-position buckets), added to the scaled scores: softmax(Q·Kᵀ·scale + bias)
  with the mask applied on top. Kept apart from attn_mask because it is part of the model,
  not of the visibility pattern: a KV cache replaces the mask but keeps (re-extends) the bias.
- A query row that can see no key at all (fully masked) yields zeros, as torch SDPA does.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op


@define_op("attention")
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
    num_kv_groups: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Reference: torch SDPA on repeated K/V with the bias and causal triangle folded into the mask."""
    check_attention_inputs(q, k, v, attn_mask, num_kv_groups, bias)
    attn_mask = fold_bias(attn_mask, bias)
    if num_kv_groups > 1:
        k = k.repeat_interleave(num_kv_groups, dim=1)
        v = v.repeat_interleave(num_kv_groups, dim=1)
    lq, lk = q.shape[-2], k.shape[-2]
    if attn_mask is not None and attn_mask.dim() < 2:
        attn_mask = attn_mask.expand(lq, lk)  # SDPA itself wants at least (Lq, Lk)
    if is_causal and (attn_mask is not None or lq != lk):
        # SDPA's is_causal is top-left and refuses a mask alongside it: build the triangle.
        visible = causal_visibility(lq, lk, q.device)
        attn_mask = visible if attn_mask is None else _and_masks(attn_mask, visible, q.dtype)
        is_causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, num_kv_groups, bias=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def causal_visibility(lq: int, lk: int, device: torch.device | str = "cpu") -> Tensor:
    """(lq, lk) bool: query i sees key j iff j <= i + lk - lq (bottom-right aligned)."""
    rows = torch.arange(lq, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    return cols <= rows + (lk - lq)


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale the op uses: `scale`, or 1/sqrt(head_dim) when it is None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def fold_bias(attn_mask: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """One additive mask that applies `bias` and then `attn_mask` (for backends without a bias input).

    bool mask: the bias where visible, -inf where hidden; additive mask: the sum.
    """
    if bias is None:
        return attn_mask
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return attn_mask + bias


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, num_kv_groups: int,
                           bias: Tensor | None = None) -> None:
    """Raise ValueError naming the problem when the inputs break the op's contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"fxforge::attention expects 4-D q, k, v laid out (batch, heads, seq, head_dim); got "
            f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}. Reshape to that layout first."
        )
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(
            f"fxforge::attention: k{tuple(k.shape)} and v{tuple(v.shape)} do not fit q{tuple(q.shape)}: "
            f"need k (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv) with q's batch and head_dim."
        )
    if num_kv_groups < 1 or hq % hkv != 0 or hq != hkv * num_kv_groups:
        raise ValueError(
            f"fxforge::attention: {hq} query heads cannot be shared by {hkv} key/value heads in groups of "
            f"{num_kv_groups}; need Hq divisible by Hkv and num_kv_groups == Hq // Hkv"
            + (f" (= {hq // hkv})" if hkv and hq % hkv == 0 else "") + "."
        )
    target = (batch, hq, lq, lk)
    if bias is not None:
        if bias.dtype != q.dtype:
            raise ValueError(f"fxforge::attention: bias has dtype {bias.dtype}; it must be q's dtype {q.dtype}.")
        _check_broadcast("bias", bias, target)
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise ValueError(
            f"fxforge::attention: attn_mask has dtype {attn_mask.dtype}; it must be torch.bool (True = attend) "
            f"or q's dtype {q.dtype} (an additive mask). Cast it with attn_mask.to({q.dtype})."
        )
    _check_broadcast("attn_mask", attn_mask, target)


def _check_broadcast(what: str, tensor: Tensor, target: tuple[int, ...]) -> None:
    try:
        broadcast = torch.broadcast_shapes(tensor.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(target):
        raise ValueError(
            f"fxforge::attention: {what} of shape {tuple(tensor.shape)} does not broadcast to "
            f"(batch, q_heads, q_len, k_len) = {target}."
        )


def _and_masks(mask: Tensor, visible: Tensor, dtype: torch.dtype) -> Tensor:
    # A key hidden by the causal triangle is hidden whatever the user's mask says.
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf")).to(dtype)


def sample_inputs() -> list[SampleInput]:
    """Plain, causal, bool padding mask with GQA, additive mask with a scale, a position bias with
    causal, queries shorter than keys (bottom-right causal), and one decoding query.

    q, k and v are graph inputs; a mask or bias is a constant (as a model's precomputed ALiBi is).
    """
    def qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int = 8):
        return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)

    padding = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    padding[1, ..., :2] = False  # second sequence left-padded by two
    additive = torch.randn(1, 1, 5, 5)
    alibi = -torch.arange(5.0).flip(0)[None, :] * torch.tensor([0.5, 0.25])[:, None, None]  # (H, 1, Lk)
    return [
        SampleInput("plain", (*qkv(1, 2, 2, 5, 5), None, False, None, 1), inputs=3),
        SampleInput("causal", (*qkv(2, 2, 2, 5, 5), None, True, None, 1), inputs=3),
        SampleInput("bool padding mask GQA", (*qkv(2, 4, 2, 5, 5), padding, False, None, 2), inputs=3),
        SampleInput("additive mask scale=0.2", (*qkv(1, 2, 2, 5, 5), additive, False, 0.2, 1), inputs=3),
        SampleInput("alibi bias causal", (*qkv(1, 2, 2, 5, 5), None, True, None, 1, alibi[None]), inputs=3),
        SampleInput("Lq=3 < Lk=6 causal GQA", (*qkv(1, 4, 2, 3, 6), None, True, None, 2), inputs=3),
        SampleInput("one decoding query", (*qkv(1, 2, 2, 1, 6), None, True, None, 1), inputs=3),
    ]
