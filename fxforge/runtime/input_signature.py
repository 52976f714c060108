"""What a compiled graph accepts, read once from its placeholders, and the call-time check.

`CompiledModel.__call__` checks every call against this signature *before* the graph runs, so a
wrong input is an `InputError` naming the input, the shape it must have (symbolic dimensions by
name: `(s72, s53)`) and what was given, instead of a matmul/view/IndexError from deep inside the
graph. Everything comes from the traced graph: placeholders' `meta["val"]` (fake tensors with
symbolic shapes), the input pytree spec, and the row count of embeddings the inputs index.

The check is cheap by construction: shapes and dtypes are metadata; the only look at data is one
`aminmax` per token-id input, to catch ids outside the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

from fxforge.errors import InputError
from fxforge.ir.trace import CONSTANT_KWARGS, IN_SPEC, drop_constant_kwargs

aten = torch.ops.aten

# Ops that pass token ids through unchanged in value (only their layout changes), so an
# embedding behind them still indexes with the user's ids.
_ID_PRESERVING = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.flatten.using_ints, aten.clone.default,
    aten.contiguous.default, aten.expand.default, aten._to_copy.default, aten.to.dtype,
    aten.slice.Tensor, aten.select.int, aten.permute.default, aten.transpose.int,
}


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of the graph as it was traced.

    shape: static sizes as ints, symbolic ones as their symbol's name ("s53"); None where a
        dimension is an expression of symbols (not checked).
    vocab_size: rows of the embedding this input indexes, if it is token ids.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: torch.dtype
    device: torch.device
    vocab_size: int | None = None

    def shape_text(self) -> str:
        dims = ["?" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


class InputSignature:
    """The inputs a graph takes; `check(args, kwargs)` returns them flat or raises InputError."""

    def __init__(self, gm: GraphModule, check_device: bool = True):
        self.in_spec: pytree.TreeSpec | None = gm.meta.get(IN_SPEC)
        self.constants: dict[str, Any] = dict(gm.meta.get(CONSTANT_KWARGS) or {})  # baked in at trace time
        self.check_device = check_device
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs: list[InputSpec | None] = [_input_spec(gm, n) for n in self.placeholders]

    # ------------------------------------------------------------------ structure

    def flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        """(args, kwargs) in the graph's flat order; an InputError naming what is missing or extra."""
        kwargs = drop_constant_kwargs(self.constants, dict(kwargs))  # use_cache=False etc. are not inputs
        flat, spec = pytree.tree_flatten((tuple(args), kwargs))
        if self.in_spec is not None and spec != self.in_spec:
            raise InputError(self._structure_message(args, kwargs))
        if len(flat) != len(self.placeholders):
            raise InputError(f"the compiled model takes {len(self.placeholders)} inputs, got {len(flat)}")
        return flat

    def _structure_message(self, args: tuple, kwargs: dict) -> str:
        head = "inputs are structured differently from the example inputs the model was compiled with"
        want_args, want_kwargs = _top_level(self.in_spec)
        call = ", ".join([f"<arg{i}>" for i in range(want_args)] + [f"{k}=..." for k in want_kwargs])
        problems = []
        missing = [k for k in want_kwargs if k not in kwargs]
        unknown = [k for k in kwargs if k not in want_kwargs]
        if len(args) != want_args:
            problems.append(f"it takes {want_args} positional input(s), got {len(args)}")
        if missing:
            problems.append(f"missing keyword input(s) {', '.join(repr(k) for k in missing)}")
        if unknown:
            problems.append(f"unexpected keyword input(s) {', '.join(repr(k) for k in unknown)}")
        if not problems:  # same names and counts: something nested (a tuple, a dict) differs
            got = pytree.tree_flatten((tuple(args), dict(kwargs)))[1]
            problems.append(f"expected {self.in_spec}, got {got}")
        expected = "; ".join(describe(self))
        return (f"{head}: {'; '.join(problems)}. Call it as when compiled: compiled({call})"
                + (f", with {expected}" if expected else ""))

    # ------------------------------------------------------------------ values

    def check(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flatten and check every input against its traced shape, dtype, device and vocabulary."""
        flat = self.flatten(args, kwargs)
        bound: dict[str, tuple[int, str, int]] = {}  # symbol -> (size, input name, dim) first seen
        for spec, value in zip(self.inputs, flat):
            if spec is not None:
                _check_one(spec, value, bound, self.check_device)
        return flat


def _top_level(in_spec: pytree.TreeSpec) -> tuple[int, list[str]]:
    """(number of positional inputs, keyword names) of an (args, kwargs) spec."""
    args_spec, kwargs_spec = in_spec.child(0), in_spec.child(1)
    return args_spec.num_children, list(kwargs_spec.context or [])


def _check_one(spec: InputSpec, value: Any, bound: dict[str, tuple[int, str, int]], check_device: bool) -> None:
    problem = input_problem(spec, value, bound, check_device)
    if problem is not None:
        raise InputError(f"input '{spec.name}' {problem}")


def input_problem(spec: InputSpec, value: Any, bound: dict[str, tuple[int, str, int]],
                  check_device: bool = True) -> str | None:
    """What is wrong with `value` as input `spec` (the text after "input 'name' "), or None.

    `bound` maps each symbolic size to (size, input, dim) where it was first seen, so sizes that
    were one symbol at trace time must agree across inputs. Shared by call-time checks and
    calibration batches (fxforge.calibration.data), so both refuse the same inputs alike.
    """
    name, want = spec.name, spec.shape_text()
    if not isinstance(value, torch.Tensor):
        return f"must be a tensor of shape {want} and dtype {spec.dtype}, got {type(value).__name__}"
    got = tuple(value.shape)
    if value.dim() != len(spec.shape):
        return f"must have rank {len(spec.shape)} (shape {want}), got shape {got}"
    if value.dtype != spec.dtype:
        return f"must be {spec.dtype}, got {value.dtype}; convert it with .to({spec.dtype})"
    if check_device and value.device.type != spec.device.type:
        return (f"must be on device '{spec.device}' (where the model was compiled), "
                f"got '{value.device}'; move it with .to('{spec.device}')")
    for dim, (expected, size) in enumerate(zip(spec.shape, got)):
        if isinstance(expected, int) and expected != size:
            return (f"must have shape {want}, got {got}: dimension {dim} must be {expected}, as it was static "
                    f"when compiled; pass size {expected} there, or recompile with example inputs of the "
                    f"size you need")
        if isinstance(expected, str):
            first = bound.setdefault(expected, (size, name, dim))
            if first[0] != size:
                return (f"must have shape {want}, got {got}: dimension {dim} ({expected}) must equal "
                        f"dimension {first[2]} of '{first[1]}' (also {expected} when compiled), which is "
                        f"{first[0]}")
    if spec.vocab_size is not None and value.numel():
        low, high = (int(v) for v in torch.aminmax(value))
        if low < 0 or high >= spec.vocab_size:
            return (f"holds token ids in [{low}, {high}], outside the vocabulary: ids must be in "
                    f"[0, {spec.vocab_size - 1}] (the embedding has {spec.vocab_size} rows); check the "
                    f"tokenizer matches the model")
    return None


def _input_spec(gm: GraphModule, node: Node) -> InputSpec | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None  # a non-tensor input (or a graph loaded without metadata): nothing to check
    shape = tuple(_dim(s) for s in val.shape)
    vocab = _vocab_size(gm, node) if not (val.is_floating_point() or val.is_complex()) else None
    return InputSpec(node.name, shape, val.dtype, val.device, vocab)


def _dim(size: Any) -> int | str | None:
    if isinstance(size, int):
        return size
    expr = size.node.expr
    if expr.is_number:
        return int(expr)
    return str(expr) if expr.is_Symbol else None


def _vocab_size(gm: GraphModule, node: Node) -> int | None:
    """Rows of the smallest embedding `node` indexes (directly or through reshapes), if any."""
    sizes: list[int] = []
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if user.op != "call_function":
                continue
            if user.target == aten.embedding.default and user.args[1] is current:
                rows = _rows(gm, user.args[0])
                if rows is not None:
                    sizes.append(rows)
            elif user.target in _ID_PRESERVING and user.args and user.args[0] is current:
                frontier.append(user)
    return min(sizes) if sizes else None


def _rows(gm: GraphModule, weight: Any) -> int | None:
    """The static row count of an embedding table (a get_attr tensor, or any node with a fake value)."""
    if not isinstance(weight, Node):
        return None
    if weight.op == "get_attr":
        from fxforge.ir.graph import get_attr

        rows = get_attr(gm, weight.target).shape[0]
    else:
        val = weight.meta.get("val")
        rows = val.shape[0] if isinstance(val, torch.Tensor) else None
    return rows if isinstance(rows, int) else None


def describe(signature: InputSignature) -> Sequence[str]:
    """One line per tensor input: `input_ids: (s72, s53) torch.int64, ids < 256`."""
    lines = []
    for spec in signature.inputs:
        if spec is not None:
            vocab = f", ids < {spec.vocab_size}" if spec.vocab_size else ""
            lines.append(f"{spec.name}: {spec.shape_text()} {spec.dtype}{vocab}")
    return lines
