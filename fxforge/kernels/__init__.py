"""Triton kernels, one family a file. Each file registers its launchers as the `triton`
lowering of an fxforge op by name (`register_lowering("triton", "<op>")`).

`load_all()` imports every kernel module; it is called by the triton backend, not at
`import fxforge`, because importing triton is slow and triton is optional on CPU-only hosts.
"""
from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every kernel module so its lowerings are registered."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
