"""One canonical form for the IR, so passes match one spelling instead of five.

After `canonicalize(gm)`:
- every linear layer is `aten.linear(x, W, b)` with W an (out, in) parameter, whether it came
  from nn.Linear, GPT-2's Conv1D (`addmm` with an (in, out) weight), or `mm`/`matmul` with a
  parameter;
- `baddbmm(bias, a, b, beta, alpha)` (ALiBi position biases) is `bias·beta + bmm(a, b)·alpha`;
- eval-mode dropout and export's tensor-metadata assertions are gone;
- dead code and unused parameters are removed, and `node.meta["val"]` is valid.

The rules are rows of `fxforge.ir.match` (pattern, check, rewrite), each with its equation in
a comment. A rewrite returns False when it declined after all (e.g. no (out, in) weight). Canonicalization is exact: outputs are bit-identical
up to the reordering of a float sum inside the matmul.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import erase_dead, finalize, get_attr, set_attr, unique_attr_name, attr_node
from fxforge.ir.match import Capture, Match, Op, Rule, apply_rules

aten = torch.ops.aten


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


def _addmm(gm: GraphModule, m: Match) -> bool:
    # addmm(b, x, Wᵀ) -> linear(x, W, b)      (GPT-2 Conv1D stores Wᵀ as its parameter)
    weight = _out_in_weight(gm, m.root, m["rhs"])
    return weight is not None and _to_linear(gm, m.root, m["x"], weight, m["bias"])


def _mm(gm: GraphModule, m: Match) -> bool:
    # mm(x, Wᵀ) -> linear(x, W);  matmul(x, Wᵀ) -> linear(x, W)   (W a 2-D parameter)
    weight = _out_in_weight(gm, m.root, m["rhs"])
    return weight is not None and _to_linear(gm, m.root, m["x"], weight, None)


def _baddbmm(gm: GraphModule, m: Match) -> bool:
    # baddbmm(bias, a, b, beta=β, alpha=α) -> bias·β + bmm(a, b)·α     (β == 0: bmm(a, b)·α)
    # Why: ATen's baddbmm kernel wants concrete sizes, so fake propagation with a symbolic
    # batch or length fails ("SymIntArrayRef expected to contain only concrete integers");
    # spelled as bmm + add it propagates, and fuse_attention sees scores plus an additive bias.
    node, bias, beta, alpha = m.root, m["bias"], m["beta"], m["alpha"]
    graph = gm.graph
    created: list[Node] = []

    def emit(target: object, args: tuple) -> Node:
        with graph.inserting_before(node):
            created.append(graph.call_function(target, args))
        return created[-1]

    scores = emit(aten.bmm.default, (m["a"], m["b"]))
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


def _dropout_in_training(m: Match) -> str | None:
    node = m.root
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
    return "dropout in training mode is not the identity" if train else None


def _dropout(gm: GraphModule, m: Match) -> bool:
    # dropout(x, p, train=False) -> x
    m.root.replace_all_uses_with(m["x"])
    gm.graph.erase_node(m.root)
    return True


def _drop(gm: GraphModule, m: Match) -> bool:
    # _assert_tensor_metadata(x, ...) -> (nothing): dtype checks torch.export leaves behind
    gm.graph.erase_node(m.root)
    return True


def _is_bias_parameter(value: object) -> bool:
    return _param_node(value) is not None and len(_shape(value)) == 1


_X = Capture("x", lambda v: _param_node(v) is None, "an activation (a parameter on the left is no linear layer)")

RULES: list[Rule] = [
    Rule("addmm", Op(aten.addmm.default, Capture("bias", _is_bias_parameter, "a 1-D parameter"), Capture("x"),
                     Capture("rhs"), 1, 1), _addmm),  # beta = alpha = 1 only
    Rule("mm", Op({aten.mm.default, aten.matmul.default}, _X, Capture("rhs")), _mm),
    Rule("baddbmm", Op(aten.baddbmm.default, Capture("bias"), Capture("a"), Capture("b"), Capture("beta"),
                       Capture("alpha")), _baddbmm),
    Rule("dropout", Op({aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default},
                       Capture("x")), _dropout, check=_dropout_in_training),
    Rule("assert_tensor_metadata", Op(aten._assert_tensor_metadata.default), _drop),
]


def canonicalize(gm: GraphModule) -> int:
    """Rewrite `gm` in place into canonical form; returns the number of rewrites applied."""
    rewrites = apply_rules(gm, RULES).rewrites
    erase_dead(gm)
    finalize(gm)
    return rewrites
