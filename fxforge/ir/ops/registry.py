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

    def sample_inputs() -> list[SampleInput]:       # in the op's file, OpInfo-style
        return [SampleInput("eps=1e-6", (torch.randn(2, 3, 8), torch.randn(8), 1e-6))]

`sample_inputs` gives a few small argument tuples that cover the op's options; the test
tests/ir/test_every_op_every_backend.py runs each on every backend that lowers the op.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from fxforge.errors import MissingLoweringError

NAMESPACE = "fxforge"


@dataclass(frozen=True)
class SampleInput:
    """One representative call of an op, for tests that run it on every backend.

    `args` is the full positional argument tuple. The first `inputs` of them are the graph's
    runtime inputs (activations); the remaining tensors are weights, which a compiled graph
    holds as constants (get_attr nodes, ONNX initializers), so samples are lowered that way.
    """

    name: str  # what the sample covers, e.g. "bits=3 groups=2 bias" (test ids and messages)
    args: tuple
    inputs: int = 1


@dataclass
class OpDef:
    """What fxforge knows about one op: its torch op and its lowerings by backend."""

    name: str
    custom_op: Any  # torch._library.custom_ops.CustomOpDef
    lowerings: dict[str, Callable] = field(default_factory=dict)
    module: str = ""  # the Python module that defined the op (and declares its sample_inputs)

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
# Lowerings declare how far from the reference they may land: exact ones their rounding bound,
# approximate ones (e.g. MatMulNBits at accuracy_level 4 quantizes activations to int8) a lossy
# bound, which the backend check in compile() holds them to instead of failing on a known trade-off.
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
        _OPS[name] = OpDef(name=name, custom_op=custom, lowerings=_LOWERINGS.setdefault(name, {}),
                           module=reference.__module__)
        return custom

    return wrap


def register_lowering(backend: str, op_name: str, *, tolerance: Any = None) -> Callable:
    """Decorator: register `fn` as the `backend` implementation of `fxforge::<op_name>`.

    `tolerance` (an `fxforge.ir.verify.Tolerance`) is how far from the reference the lowering
    lands, measured on the op's sample_inputs: `BIT_EXACT` or `FLOAT32_REORDERED` for lowerings
    exact up to rounding, a lossy bound for lowerings approximate by design (say in the lowering
    why). Where the approximation is a backend option (MatMulNBits' accuracy_level), pass a
    function of the backend options returning the Tolerance for them.
    tests/ir/test_every_op_every_backend.py holds every lowering to its tolerance under default
    options and fails on one that declares none.
    """

    def wrap(fn: Callable) -> Callable:
        _LOWERINGS.setdefault(op_name, {})[backend] = fn
        if tolerance is not None:
            _LOWERING_TOLERANCES[(backend, op_name)] = tolerance
        else:
            _LOWERING_TOLERANCES.pop((backend, op_name), None)
        return fn

    return wrap


def sample_inputs(name: str) -> list[SampleInput]:
    """The `sample_inputs()` the op's module declares, drawn under a fixed seed (so they are the
    same on every call and leave the global RNG untouched). ValueError if it declares none."""
    op = get_op(name)
    declare = getattr(sys.modules.get(op.module), "sample_inputs", None)
    if declare is None:
        raise ValueError(
            f"fxforge op '{name}' declares no sample_inputs: add `def sample_inputs() -> "
            f"list[SampleInput]` to {op.module} (a few small calls covering its options), so "
            f"tests/ir/test_every_op_every_backend.py can run it on every backend that lowers it"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        samples = list(declare())
    if not samples:
        raise ValueError(f"{op.module}.sample_inputs() returned no samples for fxforge op '{name}'")
    return samples


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


# op name -> fn(xs, *other_args, **kwargs): the op's results for several first arguments `xs` at
# once, the other arguments shared (fxforge/ir/lockstep.py: verification's two shapes)
_MANY: dict[str, Callable] = {}


def register_many(op_name: str) -> Callable:
    """Decorator: `fn(xs, *args, **kwargs)` computes `[op(x, *args, **kwargs) for x in xs]`, bit for
    bit, sharing the work the other arguments cost (a packed weight dequantized once). Optional:
    `fxforge.ir.lockstep.run_graph_many` runs ops without one once per input set."""

    def wrap(fn: Callable) -> Callable:
        _MANY[op_name] = fn
        return fn

    return wrap


def many_for(target: Any) -> Callable | None:
    """The `register_many` function of a graph node's target, or None."""
    name = op_name_of(target)
    return _MANY.get(name) if name is not None else None


def lowering_for(backend: str, op_name: str) -> Callable:
    """The `backend` lowering of `op_name`; raises MissingLoweringError naming the op."""
    table = _LOWERINGS.get(op_name, {})
    if backend not in table:
        raise MissingLoweringError(backend, op_name, sorted(table))
    return table[backend]


def lowering_tolerance(backend: str, op_name: str, backend_options: Mapping[str, Any] | None = None) -> Any:
    """The Tolerance the lowering declared under `backend_options`, or None if it declared none."""
    declared = _LOWERING_TOLERANCES.get((backend, op_name))
    return declared(dict(backend_options or {})) if callable(declared) else declared


def backends_lowering(op_name: str) -> list[str]:
    """Which backends have a lowering for `op_name` (the eager backend always does)."""
    return ["eager", *sorted(_LOWERINGS.get(op_name, {}))]


def _load_builtin_ops() -> None:
    # Importing the package registers every op module it lists.
    import fxforge.ir.ops  # noqa: F401
