"""One canonical form for the IR, so passes match one spelling instead of five.

After `canonicalize(gm)`:
- every linear layer is `aten.linear(x, W, b)` with W an (out, in) parameter, whether it came
  from nn.Linear, GPT-2's Conv1D (`addmm` with an (in, out) weight), or `mm`/`matmul` with a
  parameter;
- `baddbmm(bias, a, b, beta, alpha)` (ALiBi position biases) is `bias·beta + bmm(a, b)·alpha`;
- eval-mode dropout and export's tensor-metadata assertions are gone;
- dead code and unused parameters are removed, and `node.meta["val"]` is valid.

The rules are a table of (op, rewrite) rows, each with its equation in a comment. A rewrite
returns True when it changed the graph. Canonicalization is exact: outputs are bit-identical
up to the reordering of a float sum inside the matmul.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import erase_dead, finalize, get_attr, set_attr, unique_attr_name, attr_node

aten = torch.ops.aten

Rewrite = Callable[[GraphModule, Node], bool]


def _param_node(node: object) -> Node | None:
    return node if isinstance(node, Node) and node.op == "get_attr" else None


def _transposed_param(node: object) -> Node | None:
    """The get_attr node P if `node` is P.t() / P.T / P.transpose(0, 1) / P.permute(1, 0) of a 2-D P."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if node.target in (aten.t.default, aten.numpy_T.default) or (  # numpy_T: Falcon's `x @ W.T`
        node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    ) or (node.target == aten.permute.default and list(node.args[1]) == [1, 0]):
        param = _param_node(node.args[0])
        if param is not None and len(_shape(param)) == 2:
            return param
    return None


def _shape(node: Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _out_in_weight(gm: GraphModule, node: Node, weight_arg: object) -> Node | None:
    """An (out, in) weight node equivalent to the (in, out) right-hand side `weight_arg`.

    x @ P.t()  -> P is already (out, in): use it.
    x @ P      -> store P.t() as the (out, in) weight; in place when this node is P's only
                  reader, else under a new name (tied weights stay shared elsewhere).
    """
    param = _transposed_param(weight_arg)
    if param is not None:
        return param
    param = _param_node(weight_arg)
    if param is None:
        return None
    value = get_attr(gm, param.target)
    if value.dim() != 2:
        return None
    transposed = value.detach().t().contiguous()
    if len(param.users) == 1:
        set_attr(gm, param.target, transposed)
        return param
    name = unique_attr_name(gm, param.target + "_t")
    set_attr(gm, name, transposed, buffer=False, trainable=value.requires_grad)
    return attr_node(gm, name, before=node)


def _to_linear(gm: GraphModule, node: Node, x: Node, weight: Node, bias: Node | None) -> bool:
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(aten.linear.default, (x, weight, bias))
    linear.meta.update({k: v for k, v in node.meta.items() if k in ("module_path", "nn_module_stack", "val")})
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    return True


def _addmm(gm: GraphModule, node: Node) -> bool:
    # addmm(b, x, Wᵀ) -> linear(x, W, b)      (GPT-2 Conv1D stores Wᵀ as its parameter)
    bias, x, rhs = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return False
    if _param_node(bias) is None or len(_shape(bias)) != 1:
        return False
    weight = _out_in_weight(gm, node, rhs)
    return weight is not None and _to_linear(gm, node, x, weight, bias)


def _mm(gm: GraphModule, node: Node) -> bool:
    # mm(x, Wᵀ) -> linear(x, W);  matmul(x, Wᵀ) -> linear(x, W)   (W a 2-D parameter)
    x, rhs = node.args[:2]
    if _param_node(x) is not None:  # parameter on the left: not a linear layer
        return False
    weight = _out_in_weight(gm, node, rhs)
    return weight is not None and _to_linear(gm, node, x, weight, None)


def _baddbmm(gm: GraphModule, node: Node) -> bool:
    # baddbmm(bias, a, b, beta=β, alpha=α) -> bias·β + bmm(a, b)·α     (β == 0: bmm(a, b)·α)
    # Why: ATen's baddbmm kernel wants concrete sizes, so fake propagation with a symbolic
    # batch or length fails ("SymIntArrayRef expected to contain only concrete integers");
    # spelled as bmm + add it propagates, and fuse_attention sees scores plus an additive bias.
    bias, a, b = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    graph = gm.graph
    created: list[Node] = []

    def emit(target: object, args: tuple) -> Node:
        with graph.inserting_before(node):
            created.append(graph.call_function(target, args))
        return created[-1]

    scores = emit(aten.bmm.default, (a, b))
    if alpha != 1:
        scores = emit(aten.mul.Tensor, (scores, alpha))
    if beta != 0:
        if beta != 1:
            bias = emit(aten.mul.Tensor, (bias, beta))
        scores = emit(aten.add.Tensor, (bias, scores))
    for new in created:  # the rewrite belongs to the layer the baddbmm came from
        new.meta.update({k: v for k, v in node.meta.items() if k in ("module_path", "nn_module_stack")})
    node.replace_all_uses_with(scores)
    graph.erase_node(node)
    return True


def _dropout(gm: GraphModule, node: Node) -> bool:
    # dropout(x, p, train=False) -> x
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
    if train:
        return False
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    return True


def _drop(gm: GraphModule, node: Node) -> bool:
    # _assert_tensor_metadata(x, ...) -> (nothing): dtype checks torch.export leaves behind
    gm.graph.erase_node(node)
    return True


RULES: dict[object, Rewrite] = {
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.baddbmm.default: _baddbmm,
    aten.matmul.default: _mm,
    aten.dropout.default: _dropout,
    aten.feature_dropout.default: _dropout,
    aten.alpha_dropout.default: _dropout,
    aten._assert_tensor_metadata.default: _drop,
}


def canonicalize(gm: GraphModule) -> int:
    """Rewrite `gm` in place into canonical form; returns the number of rewrites applied."""
    rewrites = 0
    for node in list(gm.graph.nodes):
        rule = RULES.get(node.target) if node.op == "call_function" else None
        if rule is not None and rule(gm, node):
            rewrites += 1
    erase_dead(gm)
    finalize(gm)
    return rewrites
