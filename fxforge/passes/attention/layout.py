"""Attention computed on head-merged (B·H, L, D) tensors, for pass `fuse_attention`.

Bloom (and other Megatron-era models) run attention as `bmm` over batch·heads:

    scores = bmm(q3, k3ᵀ) ...  .view(B, H, Lq, Lk)   (split: masked and softmaxed in 4-D)
    probs.view(B·H, Lq, Lk)  ->  bmm(probs3, v3)     (merge: the value product in 3-D)

These helpers recognize the two views (`ir.match` Rule rows, read like those of `rules.py`) and give 4-D recipes for the 3-D operands, so the fused
op sees its usual (B, H, L, D) layout: `unflatten(x, 0, [-1, H])` in, `flatten(out, 0, 1)` out
(neither needs the symbolic batch or length).
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxforge.ir.match import Capture, Match, NoMatch, Op, Rule, read
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


def _heads_of(merged_src: bool):
    """The rewrite of a heads view row: H, read off the fake tensors (the check found it)."""
    def heads(found: Match) -> int | None:
        src, out = fake(found["src"]), fake(found.root)
        if src is None or out is None:
            return None
        return _static_heads(src, out) if merged_src else _static_heads(out, src)
    return heads


_merged_heads, _split_heads = _heads_of(True), _heads_of(False)

# x4.view(B·H, L, Lk) -> H   (Bloom's probabilities, viewed back to 3-D for the value bmm)
MERGE_HEADS_RULES: list[Rule] = [
    Rule("merge_heads_view", Op(VIEWS, Capture("src")), lambda _gm, m: _merged_heads(m),
         lambda m: None if _merged_heads(m) is not None else "does not merge (B, H) of a 4-D tensor with static H"),
]
# x3.view(B, H, L, Lk) -> (x3, H)   (Bloom's scores, viewed to 4-D for the mask and softmax)
SPLIT_HEADS_RULES: list[Rule] = [
    Rule("split_heads_view", Op(VIEWS, Capture("src", Node, "a node")), lambda _gm, m: (m["src"], _split_heads(m)),
         lambda m: None if _split_heads(m) is not None else "does not split (B·H) of a 3-D tensor into static H"),
]


def merge_heads_view(node: object) -> int | None:
    """H when `node` views a 4-D (B, H, L, Lk) tensor as (B·H, L, Lk), else None."""
    found = read(MERGE_HEADS_RULES, node)
    return None if isinstance(found, NoMatch) else found


def split_heads_view(node: object) -> tuple[Node, int] | None:
    """(x, H) when `node` views a 3-D (B·H, L, Lk) tensor x as (B, H, L, Lk), else None."""
    found = read(SPLIT_HEADS_RULES, node)
    return None if isinstance(found, NoMatch) else found


def split_heads(x: Value, heads: int) -> Build:
    """The 4-D (B, H, L, D) recipe of a head-merged (B·H, L, D) value."""
    return Build(aten.unflatten.int, (x, 0, [-1, heads]))


def split_shape(shape: tuple, heads: int) -> tuple:
    """The shape `split_heads` gives a (B·H, L, D) tensor of shape `shape`."""
    return (shape[0] // heads, heads, *shape[1:])


def _last_two_3d(found: Match) -> str | None:
    val = fake(found.root)
    if val is None or val.dim() != 3:
        return "not 3-D"
    dims = sorted(int(d) % 3 for d in (found["d0"], found["d1"]))
    return None if dims == [1, 2] else f"swaps dims {found['d0']}, {found['d1']}, not the last two"


# K3ᵀ = K3.transpose(-2, -1) -> K3
KEY_TRANSPOSE_3D_RULES: list[Rule] = [
    Rule("transpose_last_two_3d", Op(aten.transpose.int, Capture("src"), Capture("d0"), Capture("d1")),
         lambda _gm, m: m["src"], _last_two_3d),
]


def untranspose_key_3d(kt: object) -> Value:
    """K3 from K3ᵀ (B·H, D, Lk): strip the transpose that made it, or build the transpose back."""
    found = read(KEY_TRANSPOSE_3D_RULES, kt)
    return Build(aten.transpose.int, (kt, -2, -1)) if isinstance(found, NoMatch) else found


__all__ = ["BMMS", "MERGE_HEADS_RULES", "SPLIT_HEADS_RULES", "KEY_TRANSPOSE_3D_RULES", "merge_heads_view", "split_heads_view", "split_heads", "split_shape", "untranspose_key_3d"]
