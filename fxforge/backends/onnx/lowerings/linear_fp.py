"""fxforge::linear_fp -> table lookup (Gather) + scale + MatMul; FP8 activations via Cast.

Weights: each code indexes a 256-entry (FP8) or 16-entry (E2M1) float table, times the group
scales; all initializers, so ORT folds the dequantization at session start (file size is the
packed one; run time is a float32 MatMul: ORT's CPU provider has no FP8/FP4 GEMM).
Activations (act_fmt): per-token scale, then a round trip through ONNX's FLOAT8E4M3FN/E5M2
Cast (opset 19+, saturating), which rounds like torch's float8 conversion.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnxscript import FLOAT, INT64

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.lowerings.linear_wq_ic import expand_groups, unpack_codes
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED
from fxforge.ir.ops.linear_fp import FORMAT_MAX, decode

_ONNX_FP8 = {"e4m3": onnx.TensorProto.FLOAT8E4M3FN, "e5m2": onnx.TensorProto.FLOAT8E5M2}


def _table(fmt: str) -> onnx.TensorProto:
    codes = torch.arange(16 if fmt == "e2m1" else 256, dtype=torch.uint8)
    values = torch.nan_to_num(decode(codes, fmt), nan=0.0)  # NaN codes are never produced by encode
    return onnx.numpy_helper.from_array(values.numpy().astype(np.float32))


@register_lowering("onnx", "linear_fp", tolerance=FLOAT32_REORDERED)
def linear_fp_onnx(x, codes, scales, bias, fmt: str, group_size: int, act_fmt: str):
    n = codes.shape[0]
    groups = scales.shape[1]
    k = groups * group_size
    if fmt == "e2m1":
        index = op.Cast(unpack_codes(codes, 4, n, k), to=INT64.dtype)
    else:
        index = op.Cast(codes, to=INT64.dtype)
    values = op.Gather(op.Constant(value=_table(fmt)), index, axis=0)
    weight = op.Mul(values, expand_groups(op.Cast(scales, to=FLOAT.dtype), n, groups, group_size))
    x32 = op.Cast(x, to=FLOAT.dtype)
    if act_fmt:
        fmax = op.Constant(value_float=FORMAT_MAX[act_fmt])
        scale = op.Div(op.ReduceMax(op.Abs(x32), op.Constant(value_ints=[-1]), keepdims=1), fmax)
        scale = op.Where(op.Equal(scale, op.Constant(value_float=0.0)), op.Constant(value_float=1.0), scale)
        scaled = op.Clip(op.Div(x32, scale), op.Neg(fmax), fmax)
        x32 = op.Mul(op.Cast(op.Cast(scaled, to=_ONNX_FP8[act_fmt]), to=FLOAT.dtype), scale)
    y = op.MatMul(x32, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype))
    return op.CastLike(y, x)
