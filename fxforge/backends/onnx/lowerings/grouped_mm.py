"""ONNX translation of transformers' grouped matmul `transformers::grouped_mm_fallback`: the
mixture-of-experts kernel its MoE layers trace to on CPU (torch.onnx has no translation for it).

    out[r] = x[r] @ weight[g]   for offs[g-1] <= r < offs[g]   (rows sorted by expert g)

Rows past offs[-1] are zeros, as in transformers' reference. The expert count is static, so
this is one MatMul per expert over its rows (Gather of a Range), concatenated; gathering the
weight per row instead would materialize a (rows, in, out) tensor.
"""
from __future__ import annotations

from typing import Callable

from onnxscript import INT64

from fxforge.backends.onnx.lowerings import opset as op


def grouped_mm_onnx(x, weight, offs):
    experts = weight.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped_mm: the expert count (weight.shape[0]) must be static to lower to ONNX")
    ends = op.Cast(offs, to=INT64.dtype)
    start, one = op.Constant(value_int=0), op.Constant(value_int=1)
    parts = []
    for g in range(experts):
        index = op.Constant(value_int=g)
        end = op.Gather(ends, index, axis=0)
        rows = op.Gather(x, op.Range(start, end, one), axis=0)  # this expert's rows, (n_g, in)
        parts.append(op.MatMul(rows, op.Gather(weight, index, axis=0)))
        start = end
    out = op.Concat(*parts, axis=0)
    # rows no expert took (offs[-1] < rows of x) stay zero
    missing = op.Sub(op.Shape(x, start=0, end=1), op.Reshape(start, op.Constant(value_ints=[1])))
    zero = op.Constant(value_ints=[0])
    return op.Pad(out, op.Concat(zero, zero, missing, zero, axis=0))


def foreign_translations() -> dict[object, Callable]:
    """{op overload: translation} for transformers' grouped matmul, when it is registered."""
    import torch

    table: dict[object, Callable] = {}
    try:  # registered when transformers' MoE integration is imported (a traced MoE model did)
        table[torch.ops.transformers.grouped_mm_fallback.default] = grouped_mm_onnx
    except (AttributeError, RuntimeError):
        pass
    return table
