"""The fxforge op registry: define an op once, lower it per backend by name.

An fxforge op is a `torch.library.custom_op` in the `fxforge` namespace whose Python body is
its *reference implementation* (plain torch, runs on CPU, defines the semantics). A fake
implementation gives shapes for tracing. Backends register lowerings against the op's name;
`lowering_for` is how a backend asks for one and it raises `MissingLoweringError` naming the
op when there is none, so nothing is ever silently computed some other way.

    @define_op("rms_norm")
    def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ...reference...

    @rms_norm.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x)

    @register_lowering("onnx", "rms_norm")
    def rms_norm_onnx(x, weight, eps: float): ...   # an onnxscript function
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from fxforge.errors import MissingLoweringError

NAMESPACE = "fxforge"


@dataclass
class OpDef:
    """What fxforge knows about one op: its torch op and its lowerings by backend."""

    name: str
    custom_op: Any  # torch._library.custom_ops.CustomOpDef
    lowerings: dict[str, Callable] = field(default_factory=dict)

    @property
    def overload(self) -> torch._ops.OpOverload:
        """The `torch.ops.fxforge.<name>.default` overload that graph nodes call."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    @property
    def reference(self) -> Callable:
        return self.overload


_OPS: dict[str, OpDef] = {}
# Lowerings may be registered before the op module is imported (kernels and ONNX
# translations live in their own packages), so they are keyed by name, not by OpDef.
_LOWERINGS: dict[str, dict[str, Callable]] = {}
# Lowerings that compute the op only approximately (e.g. MatMulNBits at accuracy_level 4
# quantizes activations to int8) declare how far from the reference they may land, so the
# backend check in compile() holds them to that bound instead of failing on a known trade-off.
_LOWERING_TOLERANCES: dict[tuple[str, str], Any] = {}


def define_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: define `fxforge::<name>` from a reference implementation.

    The decorated function's type hints become the op schema (see torch.library.custom_op).
    Returns the CustomOpDef, on which `register_fake` must be called.
    """
    if name in _OPS:
        raise ValueError(f"fxforge op '{name}' is already defined")

    def wrap(reference: Callable):
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(reference)
        _OPS[name] = OpDef(name=name, custom_op=custom, lowerings=_LOWERINGS.setdefault(name, {}))
        return custom

    return wrap


def register_lowering(backend: str, op_name: str, *, tolerance: Any = None) -> Callable:
    """Decorator: register `fn` as the `backend` implementation of `fxforge::<op_name>`.

    `tolerance` (an `fxforge.ir.verify.Tolerance`) is for lowerings that are approximate by
    design; say in the lowering why. Exact lowerings leave it None. Where the approximation is a
    backend option (MatMulNBits' accuracy_level), pass a function of the backend options
    returning the Tolerance, or None where those options make the lowering exact.
    """

    def wrap(fn: Callable) -> Callable:
        _LOWERINGS.setdefault(op_name, {})[backend] = fn
        if tolerance is not None:
            _LOWERING_TOLERANCES[(backend, op_name)] = tolerance
        else:
            _LOWERING_TOLERANCES.pop((backend, op_name), None)
        return fn

    return wrap


def get_op(name: str) -> OpDef:
    _load_builtin_ops()
    if name not in _OPS:
        raise KeyError(f"no fxforge op named '{name}'. Known ops: {', '.join(sorted(_OPS))}")
    return _OPS[name]


def all_ops() -> dict[str, OpDef]:
    _load_builtin_ops()
    return dict(_OPS)


def op_name_of(target: Any) -> str | None:
    """The fxforge op name of a graph node target, or None if it is not an fxforge op."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return target._opname
    return None


def lowering_for(backend: str, op_name: str) -> Callable:
    """The `backend` lowering of `op_name`; raises MissingLoweringError naming the op."""
    table = _LOWERINGS.get(op_name, {})
    if backend not in table:
        raise MissingLoweringError(backend, op_name, sorted(table))
    return table[backend]


def lowering_tolerance(backend: str, op_name: str, backend_options: Mapping[str, Any] | None = None) -> Any:
    """The Tolerance an approximate lowering declared under `backend_options`, or None for an
    exact one."""
    declared = _LOWERING_TOLERANCES.get((backend, op_name))
    return declared(dict(backend_options or {})) if callable(declared) else declared


def backends_lowering(op_name: str) -> list[str]:
    """Which backends have a lowering for `op_name` (the eager backend always does)."""
    return ["eager", *sorted(_LOWERINGS.get(op_name, {}))]


def _load_builtin_ops() -> None:
    # Importing the package registers every op module it lists.
    import fxforge.ir.ops  # noqa: F401
