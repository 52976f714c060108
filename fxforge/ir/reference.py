"""What a lossy pass claims to compute, and the reference graph built from that claim.

A lossy pass (quantize, sparsify, prune, ...) cannot be checked against the graph before it:
its outputs move by its loss, which may be large and honest. It can be checked exactly against
its own semantics: "the graph before, with each rewritten linear's weight replaced by the
dequantized weight I chose". The pass records that claim in a `Semantics` while it rewrites,
from the values its method chose (codes, scales, masks), not from the packed buffers it emits,
so a packing, layout or group-assignment bug makes the rewritten graph disagree with the claim.

`reference_graph(before, semantics)` builds the claim as a GraphModule cheaply: it copies the
graph's nodes (not its tensors), shares every tensor of `before` it does not replace, and swaps
in the claimed ones. Nothing of `before` is mutated; drop the reference after the check.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxforge.ir.graph import get_attr, set_attr

aten = torch.ops.aten

LinearFn = Callable[[Tensor, Optional[Tensor]], Tensor]


@dataclass
class Semantics:
    """A pass's claim about its result, as edits of the graph before it.

    weights: attribute name in the graph before -> the tensor the result computes with in its
        place (a dequantized or masked weight, a rescaled norm weight). Cast to the original's
        dtype in the reference.
    linears: weight name -> fn(x, bias) replacing every `aten.linear(x, W, bias)` that reads W,
        for rewrites whose meaning is not a weight alone (activations quantized at run time,
        a bias a pruning pass adds). `fn` is any callable; it runs on the linear's own inputs.
        One with a `many(xs, bias)` method computing fn(x, bias) for each x lets verification
        build its weight once for both shapes (`fxforge.ir.lockstep`).
    unverified: why this claim cannot be held exactly (e.g. pruning the residual width is not
        zeroing it); non-empty: verification skips the exact check, says so and still measures
        the loss. Use sparingly: it turns the bug check off for the pass.
    """

    weights: dict[str, Tensor] = field(default_factory=dict)
    linears: dict[str, LinearFn] = field(default_factory=dict)
    unverified: str = ""

    def replace_weight(self, name: str, value: Tensor) -> None:
        self.weights[name] = value.detach()

    def replace_linear(self, weight_name: str, fn: LinearFn) -> None:
        self.linears[weight_name] = fn

    def __bool__(self) -> bool:
        return bool(self.weights or self.linears or self.unverified)


def reference_graph(before: GraphModule, semantics: Semantics) -> GraphModule:
    """`before` as the claim describes it; shares every tensor of `before` it does not replace."""
    graph = copy.deepcopy(before.graph)  # nodes only: get_attr nodes name tensors, they do not hold them
    # GraphModule(root, graph) copies the attributes get_attr nodes read *by reference*, under
    # fresh intermediate modules, so swapping a tensor below never touches `before`.
    reference = GraphModule(before, graph, class_name="SemanticsReference")
    reference.meta.update(before.meta)
    for name, value in semantics.weights.items():
        original = get_attr(before, name)
        set_attr(reference, name, value.to(original.dtype), buffer=True)
    if semantics.linears:
        _replace_linears(reference, semantics.linears)
    reference.recompile()
    return reference


def _replace_linears(gm: GraphModule, linears: dict[str, LinearFn]) -> None:
    """Every aten.linear(x, W, bias) reading a claimed W, and every fxforge linear op whose first
    tensor after x is a claimed one (linear_wq's qweight: a pass that rewrote a quantized layer
    claims what it computes in terms of its float weight), becomes fn(x, bias)."""
    from fxforge.ir.ops import op_name_of

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or len(node.args) < 2:
            continue
        name = op_name_of(node.target)
        if node.target != aten.linear.default and not (name and "linear" in name):
            continue
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target in linears):
            continue
        if node.target == aten.linear.default:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        else:
            bound = dict(zip((a.name for a in node.target._schema.arguments), node.args), **node.kwargs)
            bias = bound.get("bias")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_named(linears[weight.target]), (node.args[0], bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _named(fn: LinearFn) -> Callable[..., Any]:
    """A def wrapper: FX codegen needs a __name__ (partials and lambdas print badly)."""

    def semantic_linear(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return fn(x, bias)

    many = getattr(fn, "many", None)
    if many is not None:  # fn(x) for several x at once (fxforge/ir/lockstep.py): e.g. one ŵ for all
        semantic_linear.fxforge_many = many  # type: ignore[attr-defined]
    return semantic_linear


__all__ = ["Semantics", "reference_graph", "LinearFn"]
