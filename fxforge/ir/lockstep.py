"""Running one graph at several input sets node by node (`run_graph_many`).

Why: verification runs every graph at two input shapes, and for a quantized model each run of a
packed-weight op dequantizes its weight again; that costs more than the matmuls at verification's
few tokens (4-layer TinyLlama-shaped int4 decoder: ~1.0 CPU s a run, 0.25 s for the float
model). Stepping both runs through the graph together lets such an op build its weight once and
multiply every input set by it (an fxforge op by `fxforge.ir.ops.registry.register_many`; a
callable target, such as a semantics reference's linear, by a `fxforge_many` attribute of the
same form), with one layer's weight alive at a time as in a single run, and no cache of every
layer's dense weight (issue 15's memory bounds).

Every other node runs once per input set exactly as `GraphModule.__call__` would run it, and a
batched op computes each set's result with the same calls as alone: the outputs are bit for bit
those of separate runs (tests/ir/test_lockstep.py).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Interpreter, Node

from fxforge.ir.ops.registry import many_for
from fxforge.ir.scratch import scratch_buffers


def _many_of(target: Any) -> Callable[..., list[Any]] | None:
    """fn(xs, *other_args, **kwargs) computing `target` for several first arguments at once."""
    return many_for(target) or getattr(target, "fxforge_many", None)


def run_graph_many(gm: GraphModule, input_sets: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """`[run_graph(gm, inputs) for inputs in input_sets]`, computed node by node together."""
    if len(input_sets) < 2 or type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        from fxforge.ir.verify import run_graph

        return [run_graph(gm, inputs) for inputs in input_sets]
    runs = [Interpreter(gm, garbage_collect_values=False) for _ in input_sets]
    for run, inputs in zip(runs, input_sets):
        run.env, run.args_iter = {}, iter(inputs)
    dead_after = _last_uses(gm)
    outputs: list[Any] = []
    with torch.no_grad(), scratch_buffers():
        for node in gm.graph.nodes:
            values = _batched(node, runs) if node.op == "call_function" else None
            if values is None:
                values = [run.run_node(node) for run in runs]
            if node.op == "output":
                outputs = [list(pytree.tree_leaves(v)) for v in values]
                break
            for run, value in zip(runs, values):
                run.env[node] = value
            for dead in dead_after.get(node, ()):
                for run in runs:
                    del run.env[dead]
    return outputs


def _batched(node: Node, runs: list[Interpreter]) -> list[Any] | None:
    """The node's value for every run from one call of its registered op, when the runs'
    arguments differ only in the first; None: run it once per set."""
    many = _many_of(node.target)
    if many is None or not node.args:
        return None
    calls = [run.fetch_args_kwargs_from_env(node) for run in runs]
    (args, kwargs), rest = calls[0], calls[1:]
    for other_args, other_kwargs in rest:
        if len(other_args) != len(args) or other_kwargs.keys() != kwargs.keys():
            return None
        if any(a is not b for a, b in zip(args[1:], other_args[1:])) or \
                any(kwargs[k] is not other_kwargs[k] for k in kwargs):
            return None
    return many([a[0] for a, _ in calls], *args[1:], **kwargs)


def _last_uses(gm: GraphModule) -> dict[Node, list[Node]]:
    """node -> the values no later node reads (freed after it runs, as GraphModule code does)."""
    seen: set[Node] = set()
    dead_after: dict[Node, list[Node]] = {}
    for node in reversed(gm.graph.nodes):
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                dead_after.setdefault(node, []).append(used)
    return dead_after


__all__ = ["run_graph_many"]
