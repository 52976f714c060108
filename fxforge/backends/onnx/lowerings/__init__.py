"""ONNX translations of fxforge ops, one file per op.

Each file defines an onnxscript function with the op's signature and registers it with
`register_lowering("onnx", "<op>")`. `translation_table(options)` hands them to
`torch.onnx.export(..., custom_translation_table=...)`. Adding a lowering is adding a file.
A lowering that depends on a backend option (`OnnxOptions`, `options.py`) takes it as a
keyword-only `options` parameter; the table binds it for one export.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

import onnxscript

from fxforge.backends.onnx.options import OnnxOptions, bind_options
from fxforge.ir.ops import all_ops

OPSET_VERSION = 23  # the standard Attention operator needs 23
opset = onnxscript.opset23
msft = onnxscript.values.Opset("com.microsoft", 1)


def load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def translation_table(options: OnnxOptions | None = None) -> dict[object, Callable]:
    """{torch op overload: onnxscript function} for every fxforge op with an ONNX lowering,
    each bound to `options` (default `OnnxOptions()`) where it reads them."""
    from fxforge.backends.onnx.lowerings.grouped_mm import foreign_translations

    options = options if options is not None else OnnxOptions()
    load_all()
    table = foreign_translations()  # other libraries' ops a traced model may hold (MoE grouped matmul)
    table.update({op.overload: bind_options(op.lowerings["onnx"], options)
                  for op in all_ops().values() if "onnx" in op.lowerings})
    return table
