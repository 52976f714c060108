"""Backends: thin maps from fxforge ops to implementations. No technique logic lives here.

A backend's `prepare(gm, example_inputs, **options)` returns a `Runner`: a callable taking the
graph's flat inputs and returning its flat outputs. Asked to lower an op it has no lowering for,
a backend raises MissingLoweringError naming the op.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch
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

    `exact` when every lowering in the graph is exact and it computes in float32; otherwise the
    loosest of the bounds the approximate lowerings declared (see `register_lowering(...,
    tolerance=...)`), so a model with, say, MatMulNBits at accuracy level 4 is held to that op's
    documented error (the declared bounds may depend on `backend_options`), and of the bound its
    dtype allows (`dtype_tolerance`). Lowerings exact up to float32 rounding declare an
    elementwise bound (max_abs set, e.g. `FLOAT32_REORDERED`): that is one op's rounding, which
    `exact` (the bound for a whole model of such ops) already allows for, so only lossy
    declarations (max_abs None) loosen it, and so do ops that round their activations, where
    one reordered sum before them lands a step away (`fxforge.ir.activation_rounding`).
    """
    from fxforge.ir.activation_rounding import ACTIVATION_ROUNDING, rounding_ops
    from fxforge.ir.ops import lowering_tolerance
    from fxforge.ir.verify import Tolerance

    declared = [t for t in (lowering_tolerance(backend, op, backend_options) for op in fxforge_ops_in(gm))
                if t is not None and t.max_abs is None]
    declared += [t for t in [dtype_tolerance(gm)] if t]
    if rounding_ops(gm):  # 8-bit activations: the backend's reordered floats flip a few roundings
        declared.append(ACTIVATION_ROUNDING)
    if not declared:
        return exact
    rels = [t.max_rel for t in declared if t.max_rel is not None]
    cosines = [t.min_cosine for t in declared if t.min_cosine is not None]
    return Tolerance.lossy(max_rel=max(rels) if rels else None,
                           min_cosine=min(cosines) if cosines else None)


# Relative L2 error and cosine two correct runs of a low-precision graph can differ by when one
# rounds differently (ONNX computes a bfloat16 graph in float32, eager in bfloat16): a few units
# of the format's epsilon (bf16 2**-8, fp16 2**-11), accumulated over the layers.
LOW_PRECISION_TOLERANCE = {torch.bfloat16: (3e-2, 0.999), torch.float16: (5e-3, 0.9999)}


def dtype_tolerance(gm: GraphModule) -> "Tolerance | None":
    """The bound a backend can meet against eager for `gm`'s float dtype (None for float32)."""
    from fxforge.ir.verify import Tolerance

    dtypes = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}
    bounds = [LOW_PRECISION_TOLERANCE[d] for d in dtypes if d in LOW_PRECISION_TOLERANCE]
    if not bounds:
        return None
    return Tolerance.lossy(max_rel=max(b[0] for b in bounds), min_cosine=min(b[1] for b in bounds))


def fxforge_ops_in(gm: GraphModule) -> list[str]:
    """Names of the fxforge ops `gm` calls, in graph order, without repeats."""
    from fxforge.ir.ops import op_name_of

    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        name = op_name_of(node.target) if node.op == "call_function" else None
        if name:
            seen[name] = None
    return list(seen)
