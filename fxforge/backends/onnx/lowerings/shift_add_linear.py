"""fxforge::shift_add_linear -> standard ONNX ops (rebuild ŵ from sign planes, then MatMul).

    bits  = BitwiseAnd(packed[..., None], [1, 2, 4, ..., 2^31])      (N, W, q, 32)
    b     = Where(bits != 0, +1, -1), reordered to (N, q, K)         the sign planes
    α     = ReduceSum(signs · Pow(2, exps), terms)                    (N, G, q), exact
    ŵ     = ReduceSum(α ⊙ b, planes)                                  (N, K)
    y     = MatMul(x, ŵᵀ) + bias                                      in float32, cast back

Every input of the rebuild is an initializer, so ONNX Runtime constant-folds it at session
start: the file keeps the packed form (one bit per weight and plane, plus int8 exponents and
signs) but the session multiplies by a float32 ŵ. That is the trade the op's docstring names:
portability over the multiplication-free arithmetic and run-time memory. No com.microsoft op
fits: MatMulNBits takes one affine scale and zero point per block, not a sum of ±α planes.
The bit test uses an int32 mask (the sign bit is -2^31) because ONNX BitShift takes only
unsigned integers.
"""
from __future__ import annotations

import onnx
from onnxscript import FLOAT

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED

_BIT_MASKS = [1 << j for j in range(31)] + [-(1 << 31)]


def _int32(name: str, values: list[int], dims: list[int]):
    # Typed int32 constants, not CastLike of int64 ones: a Cast left in the rebuild chain stops
    # ONNX Runtime from constant-folding it (observed with ORT 1.32), and the rebuild would then
    # run on every call.
    return op.Constant(value=onnx.helper.make_tensor(name, onnx.TensorProto.INT32, dims, values))


@register_lowering("onnx", "shift_add_linear", tolerance=FLOAT32_REORDERED)
def shift_add_linear_onnx(x, packed, exps, signs, bias, group_size: int):
    n, words, q = packed.shape[0], packed.shape[1], packed.shape[2]
    groups = exps.shape[1]
    k = groups * group_size  # static even where the exporter left x's last dimension symbolic
    masks = _int32("bit_masks", _BIT_MASKS, [32])
    bits = op.BitwiseAnd(op.Unsqueeze(packed, op.Constant(value_ints=[-1])), masks)
    set_bits = op.Not(op.Equal(bits, _int32("zero", [0], [])))
    plus, minus = op.Constant(value_float=1.0), op.Constant(value_float=-1.0)
    planes = op.Where(set_bits, plus, minus)  # (N, W, q, 32)
    planes = op.Reshape(op.Transpose(planes, perm=[0, 2, 1, 3]), op.Constant(value_ints=[n, q, words * 32]))
    if words * 32 != k:  # padding bits past K
        planes = op.Slice(planes, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[2]))
    planes = op.Reshape(planes, op.Constant(value_ints=[n, q, groups, group_size]))

    powers = op.Pow(op.Constant(value_float=2.0), op.Cast(exps, to=FLOAT.dtype))
    alpha = op.ReduceSum(op.Mul(op.Cast(signs, to=FLOAT.dtype), powers), op.Constant(value_ints=[-1]), keepdims=0)
    alpha = op.Unsqueeze(op.Transpose(alpha, perm=[0, 2, 1]), op.Constant(value_ints=[-1]))  # (N, q, G, 1)
    weight = op.ReduceSum(op.Mul(planes, alpha), op.Constant(value_ints=[1]), keepdims=0)  # (N, G, g)
    weight = op.Reshape(weight, op.Constant(value_ints=[n, k]))

    # float32 throughout, as the reference computes, whatever x's dtype (casts only where needed)
    is_float = x.dtype == FLOAT.dtype
    y = op.MatMul(x if is_float else op.Cast(x, to=FLOAT.dtype), op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias if bias.dtype == FLOAT.dtype else op.Cast(bias, to=FLOAT.dtype))
    return y if is_float else op.CastLike(y, x)
