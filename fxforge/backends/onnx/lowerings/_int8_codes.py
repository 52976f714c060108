"""ONNX building blocks for int8 codes shared by the W8A8 and LLM.int8 lowerings.

Per-token symmetric int8 codes are formed in standard ops (bit-identical to
`fxforge.ir.ops.linear_w8a8.quantize_per_token`: ONNX Round is half-to-even, Div is IEEE)
and carried as uint8 shifted by +128, because ORT's integer GEMMs take uint8 activations.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnxscript import INT32, UINT8

from fxforge.backends.onnx.lowerings import opset as op

INT8_MAX = 127.0
UINT8_ZERO_POINT = 128


def quantize_per_token_uint8(x32):
    """Per-row symmetric int8 codes shifted to uint8 (+128), and the row scales (…, M, 1)."""
    absmax = op.ReduceMax(op.Abs(x32), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Div(absmax, op.Constant(value_float=INT8_MAX))
    # A zero row would divide by zero; scale 1 quantizes it to zeros, as the reference does.
    scale = op.Where(op.Equal(scale, op.Constant(value_float=0.0)), op.Constant(value_float=1.0), scale)
    codes = op.Clip(op.Round(op.Div(x32, scale)), op.Constant(value_float=-INT8_MAX), op.Constant(value_float=INT8_MAX))
    shifted = op.Add(codes, op.Constant(value_float=float(UINT8_ZERO_POINT)))
    return op.Cast(shifted, to=UINT8.dtype), scale


def weight_as_uint8_transposed(qweight):
    """int8 (N, K) -> uint8 (K, N) shifted by +128 (initializer-only: folded at session start)."""
    shifted = op.Add(op.Cast(qweight, to=INT32.dtype), op.Constant(value=scalar(UINT8_ZERO_POINT, np.int32)))
    return op.Transpose(op.Cast(shifted, to=UINT8.dtype), perm=[1, 0])


def scalar(value: int, dtype: type) -> onnx.TensorProto:
    """A 0-d tensor of an exact integer type (op.Constant(value_int=...) is always int64)."""
    return onnx.numpy_helper.from_array(np.array(value, dtype=dtype))
