"""Checks of what a user asks of a backend, run by `compile()` before anything is traced.

A misspelt backend, an unknown option or an option of the wrong type, a tolerance given in the
wrong form, or a dtype the backend cannot run would otherwise surface after the whole pipeline
ran, as a ValueError/TypeError/AttributeError or an ONNX Runtime status code. Each becomes a
`BackendError` that names the problem and the fix, before the first pass.

Which options a backend takes is read from its `prepare` (keyword-only parameters and their
annotations) or from a module-level `OPTIONS` tuple where `prepare` forwards `**options`
(inductor), so a backend declares its options once, where it uses them.
"""
from __future__ import annotations

import importlib
import inspect
import math
import types
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from fxforge.backends import BACKENDS
from fxforge.errors import BackendError
from fxforge.ir.verify import Tolerance

# dtype -> why the backend cannot run it and what to do instead.
UNSUPPORTED_DTYPES: dict[str, dict[torch.dtype, str]] = {
    # onnx runs bfloat16/float16 graphs computing in float32 (backends/onnx/compute_dtype.py)
}


def backend_options_of(backend: str) -> dict[str, Any]:
    """Option name -> its annotation (Any when unknown) for a registered backend."""
    module = importlib.import_module(BACKENDS[backend])
    declared = getattr(module, "OPTIONS", None)
    if declared is not None:
        return {name: Any for name in declared}
    prepare = module.prepare
    try:
        hints = get_type_hints(prepare)
    except Exception:  # an annotation that does not resolve: names are still worth checking
        hints = {}
    return {p.name: hints.get(p.name, Any) for p in inspect.signature(prepare).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_backend_options(backend: str, options: Any) -> dict[str, Any]:
    """`options` as a dict, each name one the backend takes and each value of its declared type."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise BackendError(f"backend_options must be a dict of option name -> value, got "
                           f"{type(options).__name__}")
    valid = backend_options_of(backend)
    takes = f"Valid options: {', '.join(valid)}." if valid else f"The {backend} backend takes no options."
    for key, value in options.items():
        if key not in valid:
            raise BackendError(f"backend '{backend}' has no option {key!r}. {takes}")
        expected = valid[key]
        if not _is_instance(value, expected):
            raise BackendError(f"backend '{backend}' option '{key}' must be {_type_text(expected)}, got "
                               f"{value!r} ({type(value).__name__}). {takes}")
        if key == "threads" and value is not None and value < 1:
            raise BackendError(f"backend '{backend}' option 'threads' must be >= 1 (or None for ONNX "
                               f"Runtime's default), got {value}")
    return dict(options)


def as_tolerance(value: Any) -> Tolerance | None:
    """`backend_tolerance` as a Tolerance: None, a Tolerance, or a float t = |a - b| <= t + t·|b|."""
    if value is None or isinstance(value, Tolerance):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise BackendError(f"backend_tolerance must be a finite number >= 0, got {value!r}")
        return Tolerance(max_abs=float(value), rtol=float(value))
    raise BackendError(f"backend_tolerance must be a float (e.g. 1e-3: |backend - eager| <= 1e-3 + "
                       f"1e-3·|eager|) or a fxforge.Tolerance, got {value!r} ({type(value).__name__})")


def check_dtypes(backend: str, gm: nn.Module, example_inputs: Any = ()) -> None:
    """A BackendError when the weights or inputs of `gm` (a graph, or the user's model before it is
    traced) use a dtype `backend` cannot run."""
    refused = UNSUPPORTED_DTYPES.get(backend)
    if not refused:
        return
    tensors = [("weight " + n, t) for n, t in gm.named_parameters()]
    tensors += [("buffer " + n, t) for n, t in gm.named_buffers()]
    tensors += [(f"input {i}", t) for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)]
    for where, tensor in tensors:
        if tensor.dtype in refused:
            raise BackendError(f"the {backend} backend cannot run {str(tensor.dtype).replace('torch.', '')} "
                               f"({where} is {tensor.dtype}): {refused[tensor.dtype]}.")


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(tp)
    if tp is int or tp is float:
        # bool is an int to Python, never to a user writing threads=True
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a typing construct this check does not model: let the backend decide


def _type_text(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))
