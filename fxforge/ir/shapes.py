"""A second set of example inputs, at another batch size and sequence length, for verification.

Checking a rewrite only at the example inputs misses bugs that depend on the shape (a size
baked into a view, a kernel path taken only for some batch). `second_shape_inputs` derives
inputs at another point of the graph's dynamic shape space from the example inputs, reading
which dimensions are dynamic from the placeholders' symbolic fake values that `ir.trace`
records (`node.meta["val"]`, e.g. input_ids: (s0, s1)):

- a symbol first seen as dimension 0 (a batch) grows: b -> b + 1 (2 -> 3, 1 -> 2). Rows are
  tiled (row i is example row i mod b), so token ids stay valid and masks stay consistent;
- any other symbol (a sequence) is trimmed by a quarter (16 -> 12), keeping the first
  positions: right-padded masks stay right-padded; a length of 1 grows to 2 by tiling;
- sizes built from symbols (s0 + s1) follow them; every new size stays in the symbol's range.

A graph with no dynamic dimension (or whose ranges admit no other size) has no second shape:
`second_shape_inputs` returns None and verification runs once. Only the inputs' shapes change,
so the second run costs about as much as the first (batch +1, sequence -25%: 36 tokens beside
the example's 32). It was batch +3 (5 x 12 = 60 tokens, almost twice the first run's: 12% of
the verification CPU time of a 4-layer TinyLlama-shaped int4 decoder's compile); +1 still gives
what the second shape is for: another batch, off the powers of two, and a shorter sequence.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule

BATCH_GROWTH = 1          # b -> b + 1: off the usual powers of two (2 -> 3)
SEQUENCE_TRIM = 4         # s -> s - s // 4


def dynamic_symbols(gm: GraphModule) -> dict[Any, tuple[int, int, bool]]:
    """Each free symbol of the inputs' shapes -> (example value, dim it was first seen at, is-batch)."""
    found: dict[Any, tuple[int, int, bool]] = {}
    for node in _placeholders(gm):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not getattr(expr, "is_Symbol", False) or expr in found:
                continue
            hint = size.node.hint
            if hint is None:
                continue
            found[expr] = (int(hint), dim, dim == 0)
    return found


def _placeholders(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _range(size: torch.SymInt, expr: Any) -> tuple[int, int]:
    """The symbol's allowed [low, high] (high may be huge for an unbounded symbol)."""
    bounds = size.node.shape_env.var_to_range.get(expr)
    if bounds is None:
        return 1, 1 << 30
    return _as_int(bounds.lower, 1), _as_int(bounds.upper, 1 << 30)


def _as_int(bound: Any, infinite: int) -> int:
    """A sympy range bound as an int; torch's int_oo (and -int_oo) has no int value."""
    try:
        return int(bound) if bound.is_number and bound.is_finite else infinite
    except (TypeError, AttributeError, ValueError):
        return infinite


def _new_size(value: int, is_batch: bool, low: int, high: int) -> int | None:
    """Another size for a dynamic dimension, within [low, high]; None if none fits."""
    candidates = [value + BATCH_GROWTH] if is_batch else [value - max(1, value // SEQUENCE_TRIM)]
    candidates += [value + 1, value - 1]  # fallbacks when the range rules the first out
    for c in candidates:
        if c != value and low <= c <= high and c >= 1:
            return c
    return None


def second_sizes(gm: GraphModule) -> dict[Any, int]:
    """symbol -> its size in the second shape (empty for a static graph)."""
    sizes: dict[Any, int] = {}
    symbols = dynamic_symbols(gm)
    for node in _placeholders(gm):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for size in val.shape:
            if isinstance(size, torch.SymInt) and size.node.expr in symbols and size.node.expr not in sizes:
                value, _, is_batch = symbols[size.node.expr]
                new = _new_size(value, is_batch, *_range(size, size.node.expr))
                if new is not None:
                    sizes[size.node.expr] = new
    return sizes


def second_shape_inputs(gm: GraphModule, inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """`inputs` moved to the second shape (see the module docstring); None if the graph is static."""
    sizes = second_sizes(gm)
    if not sizes:
        return None
    out = []
    for node, value in zip(_placeholders(gm), inputs):
        val = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor) or val.dim() != value.dim():
            out.append(value)
            continue
        for dim, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not expr.free_symbols & set(sizes):
                continue
            new = int(expr.xreplace({s: sizes.get(s, symbol_hint(gm, s)) for s in expr.free_symbols}))
            value = resize(value, dim, new)
        out.append(value)
    return tuple(out)


def symbol_hint(gm: GraphModule, symbol: Any) -> int:
    return dynamic_symbols(gm)[symbol][0]


def resize(t: torch.Tensor, dim: int, new: int) -> torch.Tensor:
    """t with dimension `dim` trimmed to its first `new` entries, or tiled (index mod size) to `new`."""
    old = t.shape[dim]
    if new == old:
        return t
    index = torch.arange(new, device=t.device) % old
    return t.index_select(dim, index)


def describe_shapes(inputs: Sequence[Any]) -> str:
    """'2x16, 2x16': the shapes of the tensor inputs, for reports."""
    return ", ".join("x".join(str(d) for d in x.shape) or "scalar" for x in inputs if isinstance(x, torch.Tensor))


__all__ = ["second_shape_inputs", "second_sizes", "dynamic_symbols", "resize", "describe_shapes"]
