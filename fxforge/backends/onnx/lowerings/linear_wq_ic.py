"""fxforge::linear_wq_ic -> unpack + dequantize in standard ONNX ops, then MatMul.

MatMulNBits quantizes blocks along K only, so per-input-channel groups (along N) have no
fused ORT kernel. The packed codes, scales and zero points are initializers, so ONNX Runtime
constant-folds the whole dequantization at session start: the file keeps the packed size,
and the run time is a float32 MatMul (no speed-up, by design: this grouping is for accuracy).
Unpacking uses integer Div/Mod (floor division of non-negative values) rather than BitShift,
which ORT does not implement for every integer type.
"""
from __future__ import annotations

from onnxscript import FLOAT, INT32

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


def unpack_codes(packed, bits: int, rows: int, cols: int):
    """uint8 (rows, cols*bits//8) packed low bits first -> float32 codes (rows, cols)."""
    codes = op.Cast(packed, to=INT32.dtype)
    if bits == 8:
        return op.Cast(codes, to=FLOAT.dtype)
    per_byte = 8 // bits
    divisors = op.Cast(op.Constant(value_ints=[1 << (i * bits) for i in range(per_byte)]), to=INT32.dtype)
    modulus = op.Cast(op.Constant(value_ints=[1 << bits]), to=INT32.dtype)
    fields = op.Mod(op.Div(op.Unsqueeze(codes, op.Constant(value_ints=[-1])), divisors), modulus)
    return op.Cast(op.Reshape(fields, op.Constant(value_ints=[rows, cols])), to=FLOAT.dtype)


def expand_groups(per_group, rows: int, groups: int, group_size: int):
    """(rows, groups) -> (rows, groups*group_size), each value repeated group_size times."""
    tiled = op.Expand(op.Unsqueeze(per_group, op.Constant(value_ints=[-1])),
                      op.Constant(value_ints=[rows, groups, group_size]))
    return op.Reshape(tiled, op.Constant(value_ints=[rows, groups * group_size]))


@register_lowering("onnx", "linear_wq_ic", tolerance=FLOAT32_REORDERED)
def linear_wq_ic_onnx(x, qweight, scales, zeros, bias, bits: int, group_size: int):
    k = qweight.shape[0]
    groups = scales.shape[1]
    n = groups * group_size
    codes = unpack_codes(qweight, bits, k, n)
    zero = expand_groups(op.Cast(zeros, to=FLOAT.dtype), k, groups, group_size)
    scale = expand_groups(op.Cast(scales, to=FLOAT.dtype), k, groups, group_size)
    weight_t = op.Mul(op.Sub(codes, zero), scale)
    y = op.MatMul(op.Cast(x, to=FLOAT.dtype), weight_t)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype))
    return op.CastLike(y, x)
