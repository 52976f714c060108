"""Backend `triton`: each fxforge op node calls its Triton kernel; everything else stays eager.

The kernels register themselves by op name (fxforge/kernels/). An op without a kernel is an
error naming the op, never a silent fallback to the reference.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

from torch.fx import GraphModule

from fxforge.ir.ops import lowering_for, op_name_of


def prepare(gm: GraphModule, example_inputs: Sequence[Any] = (), **options: Any) -> GraphModule:
    if options:
        raise TypeError(f"the triton backend takes no options, got {sorted(options)}")
    from fxforge.kernels import load_all

    load_all()
    lowered = copy.deepcopy(gm)
    for node in lowered.graph.nodes:
        name = op_name_of(node.target) if node.op == "call_function" else None
        if name:
            node.target = lowering_for("triton", name)
    lowered.recompile()
    return lowered
