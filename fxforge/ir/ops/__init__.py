"""fxforge's own ops, one file each (schema + reference + fake implementation).

Every module in this package is imported here, so adding an op is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil

from fxforge.ir.ops.registry import (
    OpDef,
    SampleInput,
    all_ops,
    backends_lowering,
    define_op,
    get_op,
    lowering_for,
    lowering_tolerance,
    op_name_of,
    register_lowering,
    sample_inputs,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "OpDef",
    "SampleInput",
    "all_ops",
    "backends_lowering",
    "define_op",
    "get_op",
    "lowering_for",
    "lowering_tolerance",
    "op_name_of",
    "register_lowering",
    "sample_inputs",
]
