"""torch.onnx's registry of torchlib functions, built once per process without parsing every one.

Each `torch.onnx.export` call builds an `ONNXRegistry` of every torchlib function (~1000) from
scratch (`ONNXRegistry.from_torchlib`): onnxscript's listing reads each function's ONNX IR (for
a traced function, parsing its Python source) and each registry entry infers the function's ONNX
signature. On a 4-layer TinyLlama-shaped int4 decoder that was ~0.75 of the export's ~2.1 s of
translation, for a graph that dispatches ~30 of them; the test suite pays it on every export.

`cached_torchlib_registry()` swaps in a builder with two changes, the same functions registered
in the same order otherwise:

- entries skip the signature inference (`skip_signature_inference`): the exporter infers the
  signature of a function the first time it calls one that has none (`_building.eval_function`),
  so only the functions a graph uses are parsed. The signature only names the call's inputs and
  attributes; the ONNX written is the same (tests/backends/onnx/test_export_fast_paths.py).
- the registry of torchlib's own functions is built once per opset version; each export gets a
  copy (its custom translation table is registered into the copy, not the cache).

Where the torch or onnxscript internals this relies on are not there, nothing is swapped.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Iterator

_CACHE: dict[int, Any] = {}
_LOCK = threading.Lock()


def _internals() -> tuple[Any, Any, Any] | None:
    """(torch's _registration, its own torchlib registry, onnxscript's default registry), or None."""
    try:
        from onnxscript.function_libs.torch_lib import registration as onnxscript_registration
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry
    except ImportError:
        return None
    needed = [(_registration, "ONNXRegistry"), (_registration, "OnnxDecompMeta"), (_registration, "_get_overload"),
              (_torchlib_registry, "get_torchlib_ops"), (onnxscript_registration, "default_registry")]
    if not all(hasattr(module, name) for module, name in needed):
        return None
    if "skip_signature_inference" not in _registration.OnnxDecompMeta.__dataclass_fields__:
        return None
    return _registration, _torchlib_registry, onnxscript_registration


def _build(opset_version: int) -> Any:
    """What `ONNXRegistry.from_torchlib(opset_version)` returns, signatures left to the exporter."""
    _registration, _torchlib_registry, onnxscript_registration = _internals()  # type: ignore[misc]
    registry = _registration.ONNXRegistry()
    registry._opset_version = opset_version
    for meta in _torchlib_registry.get_torchlib_ops():  # torch's own: built when torch imported them
        registry._register(meta.fx_target, meta)
    importlib.import_module("onnxscript.function_libs.torch_lib.ops")  # registers onnxscript's functions

    for qualified_name, overloads in onnxscript_registration.default_registry.items():
        if qualified_name.startswith("internal::"):  # onnxscript's helpers, not aten ops (as torch skips them)
            continue
        target = _registration._get_overload(qualified_name)
        if target is None:
            continue
        for function, is_complex in [*((f, False) for f in overloads.overloads), *((f, True) for f in overloads.complex)]:
            registry._register(target, _registration.OnnxDecompMeta(
                onnx_function=function, fx_target=target, signature=None, is_custom=False, is_complex=is_complex,
                skip_signature_inference=True))
    registry._cleanup_registry_based_on_opset_version()
    return registry


def _copy(registry: Any) -> Any:
    fresh = type(registry)()
    fresh._opset_version = registry._opset_version
    fresh.functions = {target: list(metas) for target, metas in registry.functions.items()}
    return fresh


@contextlib.contextmanager
def cached_torchlib_registry() -> Iterator[None]:
    """Within this block `torch.onnx.export` gets its torchlib registry as the module docstring says."""
    internals = _internals()
    if internals is None:
        yield
        return
    registry_class = internals[0].ONNXRegistry
    from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as default_opset

    original = registry_class.__dict__["from_torchlib"]

    def from_torchlib(cls: Any, opset_version: int = default_opset) -> Any:
        with _LOCK:
            if opset_version not in _CACHE:
                _CACHE[opset_version] = _build(opset_version)
            return _copy(_CACHE[opset_version])

    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = original


__all__ = ["cached_torchlib_registry"]
