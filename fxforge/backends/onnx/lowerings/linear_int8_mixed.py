"""fxforge::linear_int8_mixed -> standard ONNX ops: outlier mask, MatMulInteger, float MatMul.

The int8 part uses the per-token symmetric codes of `_int8_codes` (shifted to uint8; uint8 x
uint8 MatMulInteger is exact on every CPU); the outlier part multiplies the masked activations by the
dequantized weight, which ORT constant-folds at session start (so it is a float32 MatMul over
all K: correct, not fast; the mask changes per call, and ONNX has no sparse column gather-matmul
that would pay off at <1% outliers).
"""
from __future__ import annotations

from onnxscript import FLOAT

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.lowerings._int8_codes import (
    UINT8_ZERO_POINT, quantize_per_token_uint8, scalar, weight_as_uint8_transposed,
)
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED

import numpy as np


@register_lowering("onnx", "linear_int8_mixed", tolerance=FLOAT32_REORDERED)
def linear_int8_mixed_onnx(x, qweight, wscale, bias, threshold: float):
    k = qweight.shape[1]
    x32 = op.Cast(x, to=FLOAT.dtype)
    column_max = op.ReduceMax(op.Abs(op.Reshape(x32, op.Constant(value_ints=[-1, k]))),
                              op.Constant(value_ints=[0]), keepdims=0)
    is_outlier = op.GreaterOrEqual(column_max, op.Constant(value_float=threshold))
    zero = op.Constant(value_float=0.0)
    x_out = op.Where(is_outlier, x32, zero)
    x_in = op.Where(is_outlier, zero, x32)
    x_u8, x_scale = quantize_per_token_uint8(x_in)
    zero_point = op.Constant(value=scalar(UINT8_ZERO_POINT, np.uint8))
    acc = op.MatMulInteger(x_u8, weight_as_uint8_transposed(qweight), zero_point, zero_point)
    w_scale = op.Cast(wscale, to=FLOAT.dtype)
    y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT.dtype), x_scale), w_scale)
    dequantized_t = op.Transpose(op.Mul(op.Cast(qweight, to=FLOAT.dtype), op.Unsqueeze(w_scale, op.Constant(value_ints=[1]))),
                                 perm=[1, 0])
    y = op.Add(y, op.MatMul(x_out, dequantized_t))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype))
    return op.CastLike(y, x)
