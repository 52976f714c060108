"""The graph inputs' shapes in an artifact, so `fxforge.load` rebuilds shape metadata without tracing.

Save writes each input's dims as the manifest field `input_shapes`: an int for a static dim, a
name ("d0", "d1", ...) for a dynamic one, the same name where the traced graph had the same
symbol (batch shared by input_ids and attention_mask). Load makes one symbol per name, fake
placeholders of those shapes, and propagates fake tensors through the saved graph
(`fxforge.ir.graph.refresh_meta`, what every pass does after a rewrite): no torch.export, and
the graph is exactly the one saved. A graph whose inputs have derived dims (`s0 + 1`) records
None and is re-traced on load, as are artifacts written before the field existed.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from fxforge.errors import ArtifactError

DIM_NAME = re.compile(r"d[0-9]{1,6}")


def input_shapes(gm: GraphModule) -> list[list[int | str]] | None:
    """Each placeholder's dims as ints and dim names; None if any is not a plain int or symbol."""
    names: dict[Any, str] = {}
    shapes = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims: list[int | str] = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(int(d))
                continue
            expr = d.node.expr
            if expr.is_number:
                dims.append(int(expr))
            elif expr.is_Symbol:
                dims.append(names.setdefault(expr, f"d{len(names)}"))
            else:
                return None  # a derived dim: load re-traces
        shapes.append(dims)
    return shapes


def check_input_shapes(value: Any) -> list[list[int | str]] | None:
    """The manifest field `input_shapes`, type-checked (ArtifactError naming the entry)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ArtifactError("manifest field 'input_shapes' must be a list of shapes or null")
    for i, dims in enumerate(value):
        if not isinstance(dims, list) or not all(
                (type(d) is int and d >= 0) or (isinstance(d, str) and DIM_NAME.fullmatch(d)) for d in dims):
            raise ArtifactError(f"manifest field 'input_shapes[{i}]' must list dims as non-negative ints or "
                                f"names d0, d1, ...")
    return value


def can_rebuild(example_inputs: Sequence[torch.Tensor], shapes: list[list[int | str]] | None) -> bool:
    """Whether `rebuild_meta` applies: shapes recorded, and no dynamic dim whose example size is 0
    or 1 (a symbol would specialize there; tracing decides those as it did at compile time)."""
    if shapes is None or len(shapes) != len(example_inputs):
        return False
    return all(isinstance(d, int) or (i < example.dim() and example.shape[i] >= 2)
               for example, dims in zip(example_inputs, shapes) for i, d in enumerate(dims))


def rebuild_meta(gm: GraphModule, example_inputs: Sequence[torch.Tensor], shapes: list[list[int | str]]) -> None:
    """Set every node's `meta["val"]` from the saved input shapes, by fake propagation (no trace)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from fxforge.ir.graph import refresh_meta

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(shapes) != len(placeholders) or len(example_inputs) != len(placeholders):
        raise ArtifactError(f"manifest field 'input_shapes' lists {len(shapes)} inputs, the graph takes "
                            f"{len(placeholders)}")
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    symbols: dict[str, Any] = {}
    hints: dict[str, int] = {}
    for node, example, dims in zip(placeholders, example_inputs, shapes):
        if len(dims) != example.dim():
            raise ArtifactError(f"input '{node.name}': the manifest gives {len(dims)} dims, the saved example "
                                f"input has {example.dim()}")
        sizes = []
        for axis, (dim, actual) in enumerate(zip(dims, example.shape)):
            if isinstance(dim, int):
                if dim != actual:
                    raise ArtifactError(f"input '{node.name}' dim {axis}: the manifest says {dim}, the saved "
                                        f"example input has {actual}")
                sizes.append(dim)
                continue
            if hints.setdefault(dim, actual) != actual:
                raise ArtifactError(f"input '{node.name}' dim {axis} ({dim}) is {actual} in the saved example "
                                    f"input but {hints[dim]} elsewhere")
            if dim not in symbols:
                symbol = env.create_symbol(actual, ConstantSource(dim), dynamic_dim=DimDynamic.DYNAMIC)
                symbols[dim] = env.create_symintnode(symbol, hint=actual)
            sizes.append(symbols[dim])
        with mode:
            node.meta["val"] = torch.empty(sizes, dtype=example.dtype, device=example.device)
    refresh_meta(gm)


__all__ = ["input_shapes", "check_input_shapes", "can_rebuild", "rebuild_meta"]
