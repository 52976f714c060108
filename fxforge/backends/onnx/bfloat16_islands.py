"""bfloat16 arithmetic inside a float32 graph, computed in float32 and rounded back.

Some float32 models build a small tensor in bfloat16 on purpose: Falcon's ALiBi is
`bfloat16(slopes) * bfloat16(positions)`, then cast to float32. Exported as is, that bfloat16
`Mul` has no kernel in ONNX Runtime's CPU provider ("Could not find an implementation for
Mul(14)"), so the model does not load. The whole-graph float32 rewrite (compute_dtype.py) is
for low-precision *models*; on a float32 model it would also drop the bfloat16 rounding the
model means to apply (Falcon's biases would differ from eager).

Here each such node computes in float32 between casts: Cast(inputs, float) -> op ->
Cast(output, bfloat16). For elementwise ops that is what PyTorch's CPU kernels do (upcast,
compute in float32, round once to bfloat16), so the result is the same bits as eager.
"""
from __future__ import annotations

import onnx_ir as ir

# Arithmetic ops without bfloat16 CPU kernels in ONNX Runtime whose float32-then-round result
# equals PyTorch's CPU result (one rounding per op). Shape/layout ops (Reshape, Cast, Concat,
# ...) do have bfloat16 kernels and are left alone.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Exp", "Log", "Sqrt",
                         "Reciprocal", "Tanh", "Sigmoid", "Erf", "Sin", "Cos", "Max", "Min"})
BF16 = ir.DataType.BFLOAT16
FLOAT = ir.DataType.FLOAT


def compute_bfloat16_in_float32(graph: ir.Graph) -> int:
    """Rewrite `graph`'s bfloat16 elementwise nodes (see the module docstring) in place; returns
    how many were rewritten."""
    rewritten = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ELEMENTWISE:
            continue
        if len(node.outputs) != 1 or node.outputs[0].dtype != BF16:
            continue
        for i, value in enumerate(node.inputs):
            if value is not None and value.dtype == BF16:
                cast = ir.node("Cast", [value], attributes={"to": FLOAT})
                cast.outputs[0].dtype, cast.outputs[0].shape = FLOAT, value.shape
                graph.insert_before(node, cast)
                node.replace_input_with(i, cast.outputs[0])
        out = node.outputs[0]
        uses = list(out.uses())  # taken before the Cast below becomes one more
        back = ir.node("Cast", [out], attributes={"to": BF16})
        narrowed = back.outputs[0]
        narrowed.dtype, narrowed.shape = BF16, out.shape
        for user, index in uses:
            user.replace_input_with(index, narrowed)
        for i, value in enumerate(graph.outputs):
            if value is out:
                graph.outputs[i] = narrowed
        name, out.name, out.dtype = out.name, f"{out.name}_float32", FLOAT
        narrowed.name = name  # the original name and dtype stay where the graph's users see them
        graph.insert_after(node, back)
        rewritten += 1
    return rewritten
