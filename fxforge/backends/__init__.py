"""Backends: thin maps from fxforge ops to implementations. No technique logic lives here.

A backend's `prepare(gm, example_inputs, **options)` returns a `Runner`: a callable taking the
graph's flat inputs and returning its flat outputs. Asked to lower an op it has no lowering for,
a backend raises MissingLoweringError naming the op.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from torch.fx import GraphModule

from fxforge.errors import BackendError

if TYPE_CHECKING:
    from fxforge.ir.verify import Tolerance

BACKENDS = {
    "eager": "fxforge.backends.eager",
    "onnx": "fxforge.backends.onnx.backend",
    "triton": "fxforge.backends.triton",
    "inductor": "fxforge.backends.inductor",
}


class Runner(Protocol):
    def __call__(self, *flat_inputs: Any) -> Sequence[Any]: ...


def resolve_backend(name: Any) -> str:
    """The registered backend `name` refers to; case and surrounding spaces are ignored ("ONNX")."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a string, one of {', '.join(BACKENDS)}; got {name!r}")
    key = name.strip().lower()
    if key not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(key, BACKENDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise BackendError(f"unknown backend '{name}'.{hint} Valid backends: {', '.join(BACKENDS)}.")
    return key


def get_backend(name: str) -> Callable[..., Runner]:
    """The `prepare` function of backend `name` (case-insensitive); BackendError if there is none."""
    return importlib.import_module(BACKENDS[resolve_backend(name)]).prepare


def check_tolerance(gm: GraphModule, backend: str, exact: "Tolerance",
                    backend_options: Mapping[str, Any] | None = None) -> "Tolerance":
    """The bound a backend's outputs must meet against eager for `gm`.

    `exact` when every lowering in the graph is exact; otherwise the loosest of the bounds the
    approximate lowerings declared (see `register_lowering(..., tolerance=...)`), so a model
    with, say, MatMulNBits at accuracy level 4 is held to that op's documented error (the
    declared bounds may depend on `backend_options`).
    """
    from fxforge.ir.ops import lowering_tolerance
    from fxforge.ir.verify import Tolerance

    declared = [t for t in (lowering_tolerance(backend, op, backend_options) for op in fxforge_ops_in(gm)) if t]
    if not declared:
        return exact
    rels = [t.max_rel for t in declared if t.max_rel is not None]
    cosines = [t.min_cosine for t in declared if t.min_cosine is not None]
    return Tolerance.lossy(max_rel=max(rels) if rels else None,
                           min_cosine=min(cosines) if cosines else None)


def fxforge_ops_in(gm: GraphModule) -> list[str]:
    """Names of the fxforge ops `gm` calls, in graph order, without repeats."""
    from fxforge.ir.ops import op_name_of

    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        name = op_name_of(node.target) if node.op == "call_function" else None
        if name:
            seen[name] = None
    return list(seen)
