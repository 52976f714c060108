"""Attention computed on head-merged (B·H, L, D) tensors, for pass `fuse_attention`.

Bloom (and other Megatron-era models) run attention as `bmm` over batch·heads:

    scores = bmm(q3, k3ᵀ) ...  .view(B, H, Lq, Lk)   (split: masked and softmaxed in 4-D)
    probs.view(B·H, Lq, Lk)  ->  bmm(probs3, v3)     (merge: the value product in 3-D)

These helpers recognize the two views and give 4-D recipes for the 3-D operands, so the fused
op sees its usual (B, H, L, D) layout: `unflatten(x, 0, [-1, H])` in, `flatten(out, 0, 1)` out
(neither needs the symbolic batch or length).
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxforge.passes.attention.rules import Build, Value, fake, same_size

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
BMMS = (aten.bmm.default,)


def _static_heads(four_d: torch.Tensor, three_d: torch.Tensor) -> int | None:
    """H when `three_d` is `four_d` (B, H, A, C) with its first two dims merged (B·H, A, C)."""
    heads = four_d.shape[1]
    if not isinstance(heads, int) or four_d.dim() != 4 or three_d.dim() != 3:
        return None
    merged = (four_d.shape[0] * heads, four_d.shape[2], four_d.shape[3])
    return heads if all(same_size(a, b) for a, b in zip(merged, three_d.shape)) else None


def merge_heads_view(node: object) -> int | None:
    """H when `node` views a 4-D (B, H, L, Lk) tensor as (B·H, L, Lk), else None."""
    if not (isinstance(node, Node) and node.target in VIEWS):
        return None
    src, out = fake(node.args[0]), fake(node)
    return None if src is None or out is None else _static_heads(src, out)


def split_heads_view(node: object) -> tuple[Node, int] | None:
    """(x, H) when `node` views a 3-D (B·H, L, Lk) tensor x as (B, H, L, Lk), else None."""
    if not (isinstance(node, Node) and node.target in VIEWS and isinstance(node.args[0], Node)):
        return None
    src, out = fake(node.args[0]), fake(node)
    heads = None if src is None or out is None else _static_heads(out, src)
    return (node.args[0], heads) if heads is not None else None


def split_heads(x: Value, heads: int) -> Build:
    """The 4-D (B, H, L, D) recipe of a head-merged (B·H, L, D) value."""
    return Build(aten.unflatten.int, (x, 0, [-1, heads]))


def split_shape(shape: tuple, heads: int) -> tuple:
    """The shape `split_heads` gives a (B·H, L, D) tensor of shape `shape`."""
    return (shape[0] // heads, heads, *shape[1:])


def untranspose_key_3d(kt: object) -> Value:
    """K3 from K3ᵀ (B·H, D, Lk): strip the transpose that made it, or build the transpose back."""
    val = fake(kt)
    if isinstance(kt, Node) and kt.target == aten.transpose.int and val is not None and val.dim() == 3 \
            and sorted(int(d) % 3 for d in kt.args[1:3]) == [1, 2]:
        return kt.args[0]
    return Build(aten.transpose.int, (kt, -2, -1))


__all__ = ["BMMS", "merge_heads_view", "split_heads_view", "split_heads", "split_shape", "untranspose_key_3d"]
