"""fxforge::dora_linear -> ONNX: the LoRA branch as MatMuls, rows rescaled by m / ‖W + s·B·A‖.

The row norm is computed from the weights in the graph (ReduceL2 over B·A), which ORT folds
once at session start since every operand is an initializer.
"""
from __future__ import annotations

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "dora_linear", tolerance=FLOAT32_REORDERED)
def dora_linear_onnx(x, weight, bias, lora_a, lora_b, magnitude, scale: float):
    s = op.CastLike(op.Constant(value_float=scale), weight)
    adapted = op.Add(weight, op.Mul(op.MatMul(lora_b, lora_a), s))
    norm = op.ReduceL2(adapted, op.Constant(value_ints=[1]), keepdims=0)
    base = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    low_rank = op.MatMul(op.MatMul(x, op.Transpose(lora_a, perm=[1, 0])), op.Transpose(lora_b, perm=[1, 0]))
    out = op.Mul(op.Add(base, op.Mul(low_rank, op.CastLike(s, low_rank))), op.Div(magnitude, norm))
    if bias is not None:
        out = op.Add(out, bias)
    return out
