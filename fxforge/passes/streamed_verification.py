"""Verification of a pass on a streamed graph (weights mapped from files), one block at a time.

The whole-graph check (`passes/verification.py`) runs the graph before, the result and the
pass's claimed semantics with every weight resident: on a streamed graph that maps in every
page of every weight file at once, the very memory streaming exists to avoid. Here each of the
three graphs runs segment by segment (`calibration.blocks.split_blocks`: prologue, each
repeated block, epilogue), and the file pages a segment read are given back before the next
one runs (`drop_all_pages`), so verification holds one block's weights at a time.

What is checked is what the whole-graph check checks, at the example inputs:

1. **Bugs.** The result's outputs must equal the semantics reference's (or the graph before's,
   for an exact pass) within the pass's tolerance (`verification._tolerance`: widened for
   16-bit outputs). When they do not, the values leaving each block (hidden states, by node
   name, the same in both graphs where the rewrite kept them) are compared in order, and the
   first block whose values differ beyond the tolerance is named: the pass is rolled back
   with a PassError saying which block went wrong.
2. **Loss.** The result against the graph before, measured and bounded by `max_loss`.

Only the example inputs are used (no second shape): one more set of three block-by-block
runs would double the reads of every weight file for little gain on a model this size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.node import map_arg

from fxforge.calibration.blocks import split_blocks
from fxforge.calibration.engine import run_segment
from fxforge.errors import PassError
from fxforge.ir.shapes import describe_shapes
from fxforge.ir.verify import LossBound, Tolerance, compare_outputs, measure_loss
from fxforge.models.lazy_weights import drop_all_pages
from fxforge.passes.cow import release
from fxforge.passes.verification import ShapeCheck, Verification, _bug_message, _tolerance, check_max_loss, claimed_reference

if TYPE_CHECKING:
    from fxforge.passes.base import Pass, PassResult
    from fxforge.passes.context import PassContext

__all__ = ["run_by_block", "verify_streamed_pass", "first_diverging_block"]

NOTE = "streamed graph: verified block by block at the example inputs only"


def run_by_block(gm: GraphModule, inputs: Sequence[Any], keep_block_outputs: bool = False
                 ) -> tuple[list[Any], list[tuple[str, dict[str, Any]]]]:
    """(flat outputs, [(segment name, {node name: value leaving it})]) of `gm` on flat `inputs`,
    run one segment at a time with the mapped pages given back after each.

    The values leaving a segment are those a later segment or the output reads; they are kept
    per segment only with `keep_block_outputs` (to name a diverging block).
    """
    plan = split_blocks(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: dict[str, Any] = {n.name: value for n, value in zip(placeholders, inputs)}
    leaving: list[tuple[str, dict[str, Any]]] = []
    with torch.no_grad():
        for segment in plan.segments:
            run_segment(gm, segment.nodes, env)
            if keep_block_outputs:
                names = {n.name for n in segment.nodes}
                leaving.append((segment.name, {k: v for k, v in env.items() if k in names}))
            drop_all_pages()
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        result = map_arg(output.args[0], lambda node: env[node.name])
    import torch.utils._pytree as pytree

    return list(pytree.tree_leaves(result)), leaving


def first_diverging_block(expected: GraphModule, got: GraphModule, inputs: Sequence[Any],
                          tolerance: Tolerance) -> str | None:
    """The first segment whose outgoing values (by node name, where both graphs have them)
    differ beyond `tolerance`, or None."""
    _, want = run_by_block(expected, inputs, keep_block_outputs=True)
    _, have = run_by_block(got, inputs, keep_block_outputs=True)
    for (name, a), (_, b) in zip(want, have):
        common = [k for k in a if k in b and isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor)]
        if common and not compare_outputs([a[k] for k in common], [b[k] for k in common], tolerance).ok:
            return name
    return None


def verify_streamed_pass(p: "Pass", before: GraphModule, after: GraphModule, result: "PassResult",
                         ctx: "PassContext", max_loss: LossBound | None = None) -> Verification:
    """`verification.verify_pass` for a streamed graph (module docstring); PassError if it fails."""
    verification = Verification(note=NOTE)
    reference, unverified = claimed_reference(p, before, result, ctx, verification)
    if unverified:
        verification.note = f"{unverified}; {NOTE}"
    inputs = tuple(ctx.example_inputs)
    try:
        outputs_before, _ = run_by_block(before, inputs)
        outputs_after, _ = run_by_block(after, inputs)
        loss = measure_loss(outputs_before, outputs_after)
        shapes = describe_shapes(inputs)
        if unverified:
            verification.checks.append(ShapeCheck(shapes, loss, loss, Tolerance(max_abs=None)))
        else:
            expected_graph = reference if reference is not None else before
            expected = run_by_block(reference, inputs)[0] if reference is not None else outputs_before
            tol = _tolerance(p, outputs_before, reference)
            check = ShapeCheck(shapes, compare_outputs(expected, outputs_after, tol), loss, tol)
            verification.checks.append(check)
            if not check.check.ok:
                block = first_diverging_block(expected_graph, after, inputs, tol)
                raise PassError(_bug_message(p, verification.against, check, None, block), pass_name=p.name,
                                node=block)
    finally:
        if reference is not None:
            release(reference)
        del reference
    check_max_loss(p, verification, max_loss, shapes)
    return verification
