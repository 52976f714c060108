"""fxforge's version, read from the installed package's metadata (pyproject.toml is the one source).

A module of its own so that modules needing the version (artifact manifests) do not import the
`fxforge` package, whose `__init__` imports them back.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fxforge")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
