"""fxforge::lora_linear -> ONNX: MatMul(x, Wᵀ) + b + scale·MatMul(MatMul(x, Aᵀ), Bᵀ).

The low-rank branch stays two thin MatMuls (never B·A materialized), so an adapted model
exports at the cost of the adapter, and ORT computes exactly the reference's expression.
"""
from __future__ import annotations

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "lora_linear", tolerance=FLOAT32_REORDERED)
def lora_linear_onnx(x, weight, bias, lora_a, lora_b, scale: float):
    base = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        base = op.Add(base, bias)
    low_rank = op.MatMul(op.MatMul(x, op.Transpose(lora_a, perm=[1, 0])), op.Transpose(lora_b, perm=[1, 0]))
    return op.Add(base, op.Mul(low_rank, op.CastLike(op.Constant(value_float=scale), low_rank)))
