"""fxforge::linear_bitdelta -> unpack sign bits, W = base + α·(2·bit - 1), MatMul.

Base, signs and α are initializers, so ORT folds W at session start: one float MatMul at run
time; the file holds the float base plus 1 bit per weight of delta.
"""
from __future__ import annotations

from onnxscript import FLOAT

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.lowerings.linear_wq_ic import unpack_codes
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "linear_bitdelta", tolerance=FLOAT32_REORDERED)
def linear_bitdelta_onnx(x, base, signs, alpha, bias):
    n, k = base.shape[0], base.shape[1]
    bits = unpack_codes(signs, 1, n, k)
    sign = op.Sub(op.Mul(bits, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    weight = op.Add(op.Cast(base, to=FLOAT.dtype), op.Mul(op.Cast(alpha, to=FLOAT.dtype), sign))
    y = op.MatMul(op.Cast(x, to=FLOAT.dtype), op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype))
    return op.CastLike(y, x)
