"""Adapters on a quantized base (QLoRA style): a LoRA branch beside a quantized linear op
(`fxforge::linear_wq` and every kind in QUANTIZED_LINEARS).

    linear_wq(x, q, scales, zeros, b, bits, g)  ->  linear_wq(x, q, ...) + s·((x·A'ᵀ)·Bᵀ)

The integer base stays as the `quantize` pass left it (its kernels, its ONNX MatMulNBits); the
branch is composed from aten ops (matmul with the transposed factor, so later passes do not
mistake it for a linear layer) and an add, which are differentiable and export as MatMuls.
Methods whose update is a plain low-rank product (lora, rslora, eva, lora_sb: `adapts_quantized`) can do this;
methods that read or rewrite the float base weight cannot and skip quantized layers. Merging
dequantizes the base and folds the update into a float linear (re-quantize afterwards if
wanted): the merged model exports as plain linears.

Gradients must flow *through* frozen quantized layers to the adapters before them, so
`ensure_linear_wq_input_grad` gives fxforge::linear_wq a backward for x (and the bias) when
its op file registers none: ∂x = g·Ŵ with Ŵ the dequantized weight.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, get_attr, matches_any
from fxforge.ir.ops import get_op, op_name_of
from fxforge.ir.ops.linear_wq import dequantize_wq

aten = torch.ops.aten


# The quantized linear ops an adapter branch can sit beside: each computes x·Ŵᵀ + b for a weight
# Ŵ its tensors stand for. Those that also quantize x (per token / tensor) are not linear in x,
# so folding an update into a float weight would change their results (merge_adapters skips them).
QUANTIZED_LINEARS = ("linear_wq", "linear_wq_ic", "linear_fp", "linear_w8a8", "linear_int8_mixed",
                     "shift_add_linear", "linear_bitdelta")
QUANTIZES_ACTIVATIONS = ("linear_w8a8", "linear_int8_mixed")


def is_quantized_linear(node: Node) -> bool:
    return node.op == "call_function" and op_name_of(node.target) in QUANTIZED_LINEARS


def merges_exactly(node: Node) -> bool:
    """Whether Ŵ (dequantized) in a float linear computes what the quantized op computes."""
    name = op_name_of(node.target)
    if name == "linear_fp":
        return not _bound_args(node).get("act_fmt")
    return name not in QUANTIZES_ACTIVATIONS


def _bound_args(node: Node) -> dict[str, Any]:
    schema = node.target._schema
    values = dict(zip((a.name for a in schema.arguments), node.args))
    values.update(node.kwargs)
    return values


def bias_of(node: Node) -> Any:
    """The bias argument of a quantized linear node (a get_attr node or None)."""
    return _bound_args(node).get("bias")


def quantized_sites(gm: GraphModule, targets: Any, exclude: Any) -> list[LinearSite]:
    """Quantized linear nodes (QUANTIZED_LINEARS) whose first tensor is a graph attribute, as
    LinearSites (weight = that tensor: linear_wq's qweight, linear_fp's codes, ...)."""
    sites = []
    for node in gm.graph.nodes:
        if not is_quantized_linear(node):
            continue
        stored, bias = node.args[1], bias_of(node)
        if not (isinstance(stored, Node) and stored.op == "get_attr"):
            continue
        path = stored.target.rsplit(".", 1)[0]
        site = LinearSite(node=node, weight_name=stored.target,
                          bias_name=bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None,
                          in_features=int(node.args[0].meta["val"].shape[-1]),
                          out_features=int(node.meta["val"].shape[-1]), module_path=path)
        if targets is not None and not matches_any(path, targets):
            continue
        if exclude and matches_any(path, exclude):
            continue
        sites.append(site)
    return sites


def dequantized_weight(gm: GraphModule, node: Node) -> Tensor:
    """The float32 weight Ŵ (out, in) a quantized linear node stands for."""
    if node.target == torch.ops.fxforge.linear_wq.default:
        x, qweight, scales, zeros, _, bits, group_size = node.args
        k = get_attr(gm, qweight.target).shape[1] * 8 // bits
        return dequantize_wq(get_attr(gm, qweight.target), get_attr(gm, scales.target),
                             get_attr(gm, zeros.target), bits, group_size, k)
    # the others: the op's reference on the identity, without bias (one-hot rows are exact in
    # every activation format these ops use, so this reads Ŵ even where x is quantized)
    values = _bound_args(node)
    k = int(node.args[0].meta["val"].shape[-1])
    args = [get_attr(gm, v.target) if isinstance(v, Node) and v.op == "get_attr" else v for v in values.values()]
    names = list(values)
    args[0] = torch.eye(k, dtype=torch.float32)
    args[names.index("bias")] = None
    return get_op(op_name_of(node.target)).reference(*args).to(torch.float32).t().contiguous()


def emit_beside_quantized(gm: GraphModule, site: LinearSite, lora_args: tuple) -> Node:
    """base + s·((x·A'ᵀ)·Bᵀ) after the linear_wq node; returns the add node (users rewired to it)."""
    x, _, _, factor_a, factor_b, scale = lora_args
    base = site.node
    users = list(base.users)
    with gm.graph.inserting_after(base):
        a_t = gm.graph.call_function(aten.t.default, (factor_a,))
    with gm.graph.inserting_after(a_t):
        hidden = gm.graph.call_function(aten.matmul.default, (x, a_t))
    with gm.graph.inserting_after(hidden):
        b_t = gm.graph.call_function(aten.t.default, (factor_b,))
    with gm.graph.inserting_after(b_t):
        branch = gm.graph.call_function(aten.matmul.default, (hidden, b_t))
    with gm.graph.inserting_after(branch):
        scaled = gm.graph.call_function(aten.mul.Tensor, (branch, scale))
    with gm.graph.inserting_after(scaled):
        out = gm.graph.call_function(aten.add.Tensor, (base, scaled))
    for node in (a_t, hidden, b_t, branch, scaled, out):
        node.meta["module_path"] = base.meta.get("module_path", "")
    for user in users:
        user.replace_input_with(base, out)
    return out


def ensure_linear_wq_input_grad() -> None:
    """Register a backward (x and bias) on fxforge::linear_wq if its op file registered none."""
    from fxforge.ir.ops import get_op

    op = get_op("linear_wq").custom_op
    if getattr(op, "_backward_fn", None) is not None:
        return

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        x, qweight, scales, zeros, bias, bits, group_size = inputs
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.bits, ctx.group_size, ctx.k, ctx.x_dtype = bits, group_size, x.shape[-1], x.dtype
        ctx.has_bias = bias is not None

    def backward(ctx: Any, grad: Tensor) -> tuple:
        qweight, scales, zeros = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_wq(qweight, scales, zeros, ctx.bits, ctx.group_size, ctx.k)
            grad_x = (grad.to(torch.float32) @ weight).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias, None, None

    op.register_autograd(backward, setup_context=setup_context)
