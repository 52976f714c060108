"""Pass `fuse_rms_norm`: the RMSNorm spelling Llama-family models export -> fxforge::rms_norm.

    w * (x32 * rsqrt(mean(x32², -1, keepdim) + eps)).to(x.dtype)   with x32 = x.to(float32)
        -> fxforge.rms_norm(x, w, eps)

Anchored at each `rsqrt`: walk up to the mean of squares and down to the weight multiply.
Exact: the op's reference computes the same float32 expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import nodes_by_op, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def _strip_casts(node: object) -> object:
    while isinstance(node, Node) and node.target in _CASTS:
        node = node.args[0]
    return node


def _other(node: Node, one: object) -> object | None:
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _match(rsqrt: Node) -> tuple[Node, Node, Node, float] | None:
    """(input x, weight, final multiply, eps) if `rsqrt` anchors an RMSNorm, else None."""
    add = rsqrt.args[0]
    if not (isinstance(add, Node) and add.target == aten.add.Tensor and isinstance(add.args[1], float)):
        return None
    eps, mean = add.args[1], add.args[0]
    if not (isinstance(mean, Node) and mean.target == aten.mean.dim and list(mean.args[1]) in ([-1],)
            and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))):
        return None
    square = mean.args[0]
    if not (isinstance(square, Node) and square.target == aten.pow.Tensor_Scalar and square.args[1] == 2):
        return None
    x32 = square.args[0]
    if len(rsqrt.users) != 1:
        return None
    normed = next(iter(rsqrt.users))
    if normed.target != aten.mul.Tensor or _other(normed, rsqrt) is not x32:
        return None
    cast_back = normed
    while len(cast_back.users) == 1 and next(iter(cast_back.users)).target in _CASTS:
        cast_back = next(iter(cast_back.users))
    if len(cast_back.users) != 1:
        return None
    scale = next(iter(cast_back.users))
    weight = _other(scale, cast_back) if scale.target == aten.mul.Tensor else None
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    return _strip_casts(x32), weight, scale, float(eps)


@register_pass
@dataclass(frozen=True)
class FuseRmsNorm(Pass):
    """Replace each RMSNorm subgraph by one fxforge::rms_norm op."""

    name = "fuse_rms_norm"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        op = get_op("rms_norm").overload
        fused = 0
        for rsqrt in list(nodes_by_op(gm, aten.rsqrt.default)):
            if getattr(rsqrt, "_erased", False):  # removed by an earlier rewrite
                continue
            match = _match(rsqrt)
            if match is None:
                continue
            x, weight, scale, eps = match
            replace_with_call(gm, scale, op, (x, weight, eps))
            fused += 1
        return PassResult(gm, sites=fused)
