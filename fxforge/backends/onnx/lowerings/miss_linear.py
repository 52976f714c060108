"""fxforge::miss_linear -> ONNX: MatMul(x, (W + ΔW)ᵀ) + b with ΔW = Dᵀ tiled along the input.

Summing x's r-wide blocks then multiplying by D equals multiplying x by Dᵀ repeated along
the input (zero padding adds nothing), so ΔW is built from the weights alone (ORT folds it)
and the activation path is one MatMul, with no reshape of dynamic-batch tensors.
"""
from __future__ import annotations

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "miss_linear", tolerance=FLOAT32_REORDERED)
def miss_linear_onnx(x, weight, bias, block):
    r = block.shape[0]
    in_features = weight.shape[1]
    repeats = -(-in_features // r)
    tiled = op.Tile(op.Transpose(block, perm=[1, 0]), op.Constant(value_ints=[1, repeats]))
    delta = op.Slice(tiled, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                     op.Constant(value_ints=[1]))
    out = op.MatMul(x, op.Transpose(op.Add(weight, delta), perm=[1, 0]))
    if bias is not None:
        out = op.Add(out, bias)
    return out
