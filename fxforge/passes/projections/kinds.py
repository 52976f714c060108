"""How each linear kind of the IR lays its tensors out along the output features, for
`fuse_projections`.

Fusing linears that read one input x means building one op whose output is the members'
outputs side by side. For every linear kind that is a concatenation of each per-output-row
tensor along its output axis; the rest of the op must be the same for all members:

    kind                 concatenated (axis)                    must be equal
    aten.linear          W (0), b                               -
    linear_wq            qweight, scales, zeros (0), bias       bits, group_size
    linear_wq_ic         qweight, scales, zeros (1), bias       bits, group_size
    linear_w8a8          qweight, wscale (0), bias              act_scale (x's scale: per tensor or token)
    linear_int8_mixed    qweight, wscale (0), bias              threshold (outliers depend on x only)
    linear_fp            codes, scales (0), bias                fmt, group_size, act_fmt
    shift_add_linear     packed, exps, signs (0), bias          group_size (and q, T by shape)
    linear_bitdelta      base, signs (0), bias                  alpha (one scale per matrix)
    bone_linear          W, blocks (0), b                       r (by shape)
    miss_linear          W (0), D (1), b                        r (by shape)
    lora_linear          W (0), b; A stacked, B block-diagonal  - (scales fold into B)
    dora_linear          W, magnitude (0), b; A, B as LoRA      - (scales fold into B)
    linear_sparse        COO entries, rows offset               -

Every entry is exact: each output row of the fused op computes what it computed in its
member, because nothing in these ops mixes output rows (activation scales and outlier columns
depend on x alone; DoRA's norm is per row; LoRA's block-diagonal B keeps each member's rank
apart, adding exact zeros for the others'). Off-axis sizes and dtypes of the concatenated
tensors must agree too (K, q and T, r), which `Member.key` checks by shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

aten = torch.ops.aten
fx_ops = torch.ops.fxforge


@dataclass(frozen=True)
class Layout:
    """Where one op's arguments sit relative to its output features.

    rows: argument index -> the axis along which that tensor holds the output features.
    bias: index of the optional bias (concatenated; zeros stand in for members without one).
    options: non-tensor arguments every member must share.
    shared: tensor arguments every member must hold bitwise equal (one value per layer).
    low_rank: (A, B, scale) indices for LoRA-style factors: A stacks along the rank, B becomes
        block-diagonal, differing scales fold into B.
    sparse: COO (indices, values, out_features) indices, for fxforge::linear_sparse.
    """

    rows: dict[int, int] = field(default_factory=dict)
    bias: int | None = None
    options: tuple[int, ...] = ()
    shared: tuple[int, ...] = ()
    low_rank: tuple[int, int, int] | None = None
    sparse: tuple[int, int, int] | None = None

    def tensor_args(self) -> tuple[int, ...]:
        """Indices of every tensor argument that must be a graph attribute (get_attr)."""
        extra = self.low_rank[:2] if self.low_rank else self.sparse[:2] if self.sparse else ()
        return (*self.rows, *self.shared, *extra)


LAYOUTS: dict[Any, Layout] = {
    aten.linear.default: Layout(rows={1: 0}, bias=2),
    fx_ops.linear_wq.default: Layout(rows={1: 0, 2: 0, 3: 0}, bias=4, options=(5, 6)),
    fx_ops.linear_wq_ic.default: Layout(rows={1: 1, 2: 1, 3: 1}, bias=4, options=(5, 6)),
    fx_ops.linear_w8a8.default: Layout(rows={1: 0, 2: 0}, bias=3, options=(4,)),
    fx_ops.linear_int8_mixed.default: Layout(rows={1: 0, 2: 0}, bias=3, options=(4,)),
    fx_ops.linear_fp.default: Layout(rows={1: 0, 2: 0}, bias=3, options=(4, 5, 6)),
    fx_ops.shift_add_linear.default: Layout(rows={1: 0, 2: 0, 3: 0}, bias=4, options=(5,)),
    fx_ops.linear_bitdelta.default: Layout(rows={1: 0, 2: 0}, bias=4, shared=(3,)),
    fx_ops.bone_linear.default: Layout(rows={1: 0, 3: 0}, bias=2),
    fx_ops.miss_linear.default: Layout(rows={1: 0, 3: 1}, bias=2),
    fx_ops.lora_linear.default: Layout(rows={1: 0}, bias=2, low_rank=(3, 4, 5)),
    fx_ops.dora_linear.default: Layout(rows={1: 0, 5: 0}, bias=2, low_rank=(3, 4, 6)),
    fx_ops.linear_sparse.default: Layout(sparse=(1, 2, 3)),
}


def kind_name(target: Any) -> str:
    """"aten.linear", "fxforge::linear_wq", ...: how reasons name a kind."""
    if target == aten.linear.default:
        return "aten.linear"
    return f"{target.namespace}::{target._opname}"


def arg_name(target: Any, index: int) -> str:
    """The schema name of argument `index` ("group_size"), for reasons."""
    return target._schema.arguments[index].name


def arg(node: Node, index: int) -> Any:
    """Argument `index` of `node`: positional, by its schema name, else the schema's default
    (so a fused op spells out an option such as linear_w8a8's act_scale its members left implicit)."""
    if index < len(node.args):
        return node.args[index]
    name = arg_name(node.target, index)
    if name in node.kwargs:
        return node.kwargs[name]
    schema_arg = node.target._schema.arguments[index]
    return schema_arg.default_value if schema_arg.has_default_value() else None
