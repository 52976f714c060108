"""fxforge::rms_norm -> ONNX ops, computed in float32 like the reference.

Spelled out (ReduceMean/Sqrt/Div) rather than RMSNormalization so the weight multiply
happens after the cast back to the input dtype, exactly as the reference does.
"""
from __future__ import annotations

from onnxscript import FLOAT

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "rms_norm", tolerance=FLOAT32_REORDERED)
def rms_norm_onnx(x, weight, eps: float):
    x32 = op.Cast(x, to=FLOAT.dtype)
    mean_square = op.ReduceMean(op.Mul(x32, x32), op.Constant(value_ints=[-1]), keepdims=1)
    normed = op.Div(x32, op.Sqrt(op.Add(mean_square, op.Constant(value_float=eps))))
    return op.Mul(weight, op.CastLike(normed, x))
