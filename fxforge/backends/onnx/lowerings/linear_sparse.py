"""fxforge::linear_sparse -> ScatterND into a zero (N, K) matrix, then MatMul.

The entries are initializers, so ONNX Runtime folds the scatter at session start: the file
stores only the nnz entries; at run time this is a dense float MatMul (EasyQuant's outliers are
for accuracy; a sparse kernel is future work).
"""
from __future__ import annotations

from onnxscript import FLOAT

from fxforge.backends.onnx.lowerings import opset as op
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "linear_sparse", tolerance=FLOAT32_REORDERED)
def linear_sparse_onnx(x, indices, values, out_features: int):
    k = x.shape[-1]
    zeros = op.ConstantOfShape(op.Constant(value_ints=[out_features, k]))
    dense = op.ScatterND(zeros, op.Transpose(indices, perm=[1, 0]), op.Cast(values, to=FLOAT.dtype), reduction="add")
    y = op.MatMul(op.Cast(x, to=FLOAT.dtype), op.Transpose(dense, perm=[1, 0]))
    return op.CastLike(y, x)
