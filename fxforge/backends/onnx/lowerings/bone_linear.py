"""fxforge::bone_linear -> ONNX: the block-affine weight W + W_ij·B_i + B_i, then MatMul (+ b).

Every shape is static (weights only), so the reshapes and the batched MatMul over blocks are
constant-folded by ORT at session start; the activation path is one MatMul.
"""
from __future__ import annotations

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "bone_linear", tolerance=FLOAT32_REORDERED)
def bone_linear_onnx(x, weight, bias, blocks):
    r = blocks.shape[2]
    out_features, in_features = weight.shape[0], weight.shape[1]
    tiles = op.Transpose(op.Reshape(weight, op.Constant(value_ints=[out_features // r, r, in_features // r, r])),
                         perm=[2, 0, 1, 3])
    updated = op.Add(op.MatMul(tiles, blocks), blocks)
    delta = op.Reshape(op.Transpose(updated, perm=[1, 2, 0, 3]), op.Constant(value_ints=[out_features, in_features]))
    out = op.MatMul(x, op.Transpose(op.Add(weight, delta), perm=[1, 0]))
    if bias is not None:
        out = op.Add(out, bias)
    return out
