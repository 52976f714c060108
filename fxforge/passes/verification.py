"""The check run after every pass: bugs against what the pass claims, loss against the graph before.

For each verification shape (the example inputs, and a second batch/sequence length where the
graph is dynamic, see `fxforge.ir.shapes`):

1. **Bugs.** The result must equal what the pass claims to compute within `Pass.tolerance()`
   (1e-5 by default): the graph before for exact passes; for lossy passes, the reference graph
   of their `Semantics` (the graph before with dequantized / masked / zeroed weights, ...).
2. **Loss.** Max abs, relative L2 and cosine of every output against the graph before are
   measured and reported, whatever the pass. They are bounded only by a `LossBound` the user
   gave (`max_loss=` on the pass or on compile); exceeding it rejects the pass.

Cost: per shape the graph before and the result run once each, plus the reference for lossy
passes; the reference shares every tensor of the graph before except those the pass replaced,
and is dropped right after the check. In a pipeline the graph before a pass is the previous
pass's result, already run at the same inputs: its outputs are reused (`_RESULT_OUTPUTS`), not
computed again. While an exact pass is checked, packed-weight ops dequantize each weight once
(`fxforge.ir.dequantize_cache`), not on every run of the graph before and after. Consecutive
exact passes share one check (`verify_chain`, driven by `passes/chained_verification.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.fx import GraphModule

from fxforge.ir.activation_rounding import rounding_ops, unrounded, unrounding
from fxforge.passes.cow import release
from fxforge.ir.dequantize_cache import reuse_dequantized
from fxforge.ir.lockstep import run_graph_many
from fxforge.errors import PassError
from fxforge.ir.shapes import describe_shapes, second_shape_inputs
from fxforge.ir.verify import (
    Comparison, LossBound, OutputError, Tolerance, compare_outputs, first_divergent_node, low_precision_tolerance,
    measure_loss, run_graph, worst_loss,
)

from fxforge.passes.base import Pass, PassResult

if TYPE_CHECKING:
    from fxforge.passes.context import PassContext


@dataclass
class ShapeCheck:
    """The verification at one input shape."""

    shapes: str            # "3x12, 3x12"
    check: Comparison      # result vs what the pass claims (bugs)
    loss: Comparison       # result vs the graph before (loss)
    tolerance: Tolerance   # the bound `check` used


@dataclass
class Verification:
    """Everything verification found for one pass; `loss` is the worst per output over shapes."""

    checks: list[ShapeCheck] = field(default_factory=list)
    against: str = "graph before"        # or "semantics": what the bug check compared with
    note: str = ""                       # e.g. why only one shape was verified

    @property
    def loss(self) -> list[OutputError]:
        return worst_loss([c.loss for c in self.checks])

    @property
    def check_error(self) -> float:
        """Largest max abs difference from what the pass claims, over shapes."""
        return max((c.check.max_error for c in self.checks), default=0.0)


def claimed_reference(p: "Pass", before: GraphModule, result: "PassResult", ctx: "PassContext",
                      verification: Verification) -> tuple[Any, str]:
    """The pass's claimed-semantics reference (None: check against the graph before) and its reason
    for claiming nothing ("" if it claims something); records what is checked against in `verification`."""
    unverified = result.semantics.unverified if result.semantics is not None else ""
    try:
        reference = None if unverified else p.semantics(before, result, ctx)
    except Exception as exc:  # a claim naming a tensor the graph before lacks, a claim of the wrong shape...
        raise PassError(f"pass '{p.spec()}' declared semantics that cannot be built on the graph before it "
                        f"({type(exc).__name__}: {exc}); this is a bug in the pass. It was rolled back; the input "
                        f"graph is unchanged.", pass_name=p.name) from exc
    if reference is not None:
        verification.against = "semantics"
    if unverified:
        verification.against = "nothing (loss only)"
    return reference, unverified


def verify_pass(p: "Pass", before: GraphModule, after: GraphModule, result: "PassResult",
                ctx: "PassContext", max_loss: LossBound | None = None) -> Verification:
    """Check `after` (the pass's result) as the module docstring says; PassError if it fails."""
    verification = Verification()
    reference, unverified = claimed_reference(p, before, result, ctx, verification)
    shapes = _verification_shapes(before, ctx, verification)
    if unverified:
        verification.note = "; ".join(filter(None, [unverified, verification.note]))
    elif rounding := rounding_ops(before):
        verification.note = "; ".join(filter(None, [
            f"checked with activations unrounded ({', '.join(rounding)} round them: a reordered "
            "sum or a cached step may land one step away; the loss is measured as they round)", verification.note]))
    # An exact pass runs the same packed weights several times (before and after, per shape):
    # each is dequantized once. Not beside a semantics reference: one with dense float weights
    # would double the peak, and under quantize's codes claim the cache held every dequantized
    # weight at once (+1.3 GiB at L=8, bench/scale.py: over the issue-15 bound of 1.3P + 1 GiB)
    # to save ~1 CPU s per 4 layers — memory is the bound here, so each graph run dequantizes
    # again (the two shapes share one run: `_runs_at_shapes`).
    reuse = contextlib.ExitStack()
    if reference is None:
        reuse.enter_context(reuse_dequantized())
    try:
        runs = _runs_at_shapes(p, after, reference, shapes)
        for index, inputs in enumerate(shapes):
            try:
                check = _check_shape(p, before, after, reference, ctx, inputs, exact=not unverified,
                                     runs=runs[index] if runs else None)
            except _BeforeFailed as exc:
                if index == 0:
                    raise exc.__cause__  # the graph before must run at its own example inputs
                verification.note = f"second shape {describe_shapes(inputs)} skipped: the graph before fails there ({exc})"
                continue
            verification.checks.append(check)
            if not check.check.ok:
                expected = reference if reference is not None else before
                node = first_divergent_node(expected, after, inputs, check.tolerance)
                raise PassError(_bug_message(p, verification.against, check, node), pass_name=p.name, node=node)
    finally:
        reuse.close()  # the dequantized weights: freed with the check
        _RESULT_OUTPUTS.pop(before, None)  # each graph is the graph before of one pass at most
        if reference is not None:
            release(reference)  # no cycle keeps the claimed weights alive past the check
        del reference  # the claimed weights: freed as soon as the check is done
    check_max_loss(p, verification, max_loss, " and ".join(c.shapes for c in verification.checks))
    return verification


def _verification_shapes(before: GraphModule, ctx: "PassContext", verification: Verification) -> list[tuple]:
    """The example inputs, and the second shape where `before` is dynamic (else a note says why not)."""
    shapes = [tuple(ctx.example_inputs)]
    second = second_shape_inputs(before, ctx.example_inputs)
    if second is None:
        verification.note = "static graph: verified at the example inputs only"
    else:
        shapes.append(second)
    return shapes


def verify_chain(check: "Pass", before: GraphModule, after: GraphModule, result: "PassResult",
                 ctx: "PassContext") -> Verification | None:
    """One check of a chain of exact passes (`passes/chained_verification.py`): `after`, the last
    pass's result, against `before`, the graph before the first, at the verification shapes,
    within `check`'s tolerance. None where it fails: the caller then checks each pass alone
    (`verify_pass`), which names the wrong one; no divergent-node search is spent here."""
    verification = Verification()
    shapes = _verification_shapes(before, ctx, verification)
    with reuse_dequantized():  # exact: each packed weight dequantized once over the runs
        runs = _runs_at_shapes(check, after, None, shapes)
        for index, inputs in enumerate(shapes):
            try:
                shape_check = _check_shape(check, before, after, None, ctx, inputs, runs=runs[index] if runs else None)
            except _BeforeFailed as exc:
                if index == 0:
                    return None  # verify_pass on the first pass raises what the graph before hits
                verification.note = (f"second shape {describe_shapes(inputs)} skipped: the graph before "
                                     f"fails there ({exc})")
                continue
            except PassError:
                return None  # a pass of the chain produced a graph that fails: found by verify_pass
            verification.checks.append(shape_check)
            if not shape_check.check.ok:
                return None  # `before`'s outputs stay kept: the first pass's own check reuses them
    _RESULT_OUTPUTS.pop(before, None)  # verified: no pass checks against it again
    return verification


def _runs_at_shapes(p: "Pass", after: GraphModule, reference: GraphModule | None,
                    shapes: list[tuple]) -> list[tuple[list[Any], list[Any] | None]] | None:
    """The result's (and the reference's) outputs at every verification shape, each graph run at
    all shapes together (`fxforge.ir.lockstep`: a packed weight is dequantized once for both, not
    once per shape: ~1 CPU s per run of a 4-layer TinyLlama-shaped int4 decoder). None where
    there is one shape, the pass compares its own way, or a run fails: `_check_shape` then runs
    each shape alone and names what failed where."""
    if len(shapes) < 2 or _overrides_verify(p):
        return None
    try:
        afters = run_graph_many(after, shapes)
        references = run_graph_many(reference, shapes) if reference is not None else [None] * len(shapes)
    except Exception:
        return None
    return list(zip(afters, references))


class _BeforeFailed(Exception):
    """The graph before the pass cannot run these inputs (then they cannot verify anything)."""


# A verified result's outputs at each verification input, kept until the next pass verifies
# against it as its graph before. Passes never change a graph they returned (they rewrite
# copies, passes/cow.py), but a user may between two passes (training adapters in place with
# `fxforge.train.fit`): the outputs are reused only while every tensor is the same object at
# the same version counter (`_tensor_state`), else the graph runs again.
_RESULT_OUTPUTS: "weakref.WeakKeyDictionary[GraphModule, list[tuple[tuple[Any, ...], list[Any], tuple]]]" = \
    weakref.WeakKeyDictionary()


def _tensor_state(gm: GraphModule) -> tuple:
    """Identity and in-place version of every parameter and buffer, and the graph's code."""
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return (gm.code, tuple((name, id(t), t._version) for name, t in tensors))


def _same_inputs(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def forget_outputs(gm: GraphModule) -> None:
    """Drop the outputs kept for `gm` (a pipeline's final graph: no later pass verifies against it)."""
    _RESULT_OUTPUTS.pop(gm, None)


def outputs_of_before(before: GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """`before`'s flat outputs at `inputs`: those its own verification kept when they still hold
    (a pass's custom `verify` calls this for the graph before it), else a new run. Inside
    `unrounded()` always a new run: the kept outputs were computed with activations rounded."""
    kept = () if unrounding() else _RESULT_OUTPUTS.get(before, ())
    state = _tensor_state(before) if kept else None
    for seen, outputs, seen_state in kept:
        if seen_state == state and _same_inputs(seen, inputs):
            return outputs
    return run_graph(before, inputs)


def _check_shape(p: "Pass", before: GraphModule, after: GraphModule, reference: GraphModule | None,
                 ctx: "PassContext", inputs: Sequence[Any], exact: bool = True,
                 runs: tuple[list[Any], list[Any] | None] | None = None) -> ShapeCheck:
    """The check at one shape; `runs`: the result's and the reference's outputs there, when
    already computed (`_runs_at_shapes`)."""
    shapes = describe_shapes(inputs)
    at_shape = dataclasses.replace(ctx, example_inputs=tuple(inputs))
    try:
        outputs_before = outputs_of_before(before, inputs)
    except Exception as exc:
        raise _BeforeFailed(f"{type(exc).__name__}: {exc}") from exc
    # After an activation-quantizing pass the claim is checked with activations unrounded (a
    # reordered sum before a quantizer flips a rounding; a cached step quantizes its own tokens:
    # fxforge/ir/activation_rounding.py); the loss is still measured as the graphs round.
    rounding = rounding_ops(before) if exact else []
    try:
        if _overrides_verify(p):  # passes that change the graph's inputs or outputs compare their own way
            check = p.verify(before, after, at_shape)
            if rounding:
                with unrounded(rounding):
                    proof = p.verify(before, after, at_shape)
                return ShapeCheck(shapes, proof, _loss_of(check), p.tolerance())
            return ShapeCheck(shapes, check, _loss_of(check), p.tolerance())
        outputs_after = runs[0] if runs is not None else run_graph(after, inputs)
    except PassError:
        raise
    except Exception as exc:
        raise PassError(
            f"pass '{p.spec()}' produced a graph that fails on inputs of shape {shapes} (the graph before runs "
            f"them) and was rolled back: {type(exc).__name__}: {exc}. The input graph is unchanged.",
            pass_name=p.name) from exc
    try:
        if runs is not None and runs[1] is not None:
            expected = runs[1]
        else:
            expected = run_graph(reference, inputs) if reference is not None else outputs_before
    except Exception as exc:
        raise PassError(
            f"pass '{p.spec()}' declared semantics whose reference graph fails on inputs of shape {shapes}: "
            f"{type(exc).__name__}: {exc}; this is a bug in the pass. It was rolled back; the input graph is "
            f"unchanged.", pass_name=p.name) from exc
    _RESULT_OUTPUTS.setdefault(after, []).append((tuple(inputs), outputs_after, _tensor_state(after)))
    loss = measure_loss(outputs_before, outputs_after)
    if not exact:  # the pass said why its claim cannot be checked; the loss is still measured
        return ShapeCheck(shapes, loss, loss, Tolerance(max_abs=None))
    tol = _tolerance(p, outputs_before, reference)
    if rounding:
        with unrounded(rounding):
            expected = run_graph(reference if reference is not None else before, inputs)
            outputs_after = run_graph(after, inputs)
    return ShapeCheck(shapes, compare_outputs(expected, outputs_after, tol), loss, tol)


def _overrides_verify(p: Pass) -> bool:
    return type(p).verify is not Pass.verify


def _loss_of(check: Comparison) -> Comparison:
    """A custom verify compares equivalent quantities of before and after: its errors are the loss."""
    return Comparison(outputs=[dataclasses.replace(o, ok=True) for o in check.outputs], structural=check.structural)


def _tolerance(p: "Pass", outputs: Sequence[Any], reference: GraphModule | None) -> Tolerance:
    """The pass's tolerance; widened for 16-bit outputs against a semantics reference, or when the
    pass rounds differently from the graph before (`Pass.reorders_float_math`, a fused kernel)."""
    tol = p.tolerance()
    if reference is None and not p.reorders_float_math:
        return tol
    dtype = next((o.dtype for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()), torch.float32)
    return low_precision_tolerance(tol, dtype)


def check_max_loss(p: "Pass", verification: Verification, bound: LossBound | None, measured_at: str) -> None:
    """PassError if any output's loss exceeds `bound` (run_pass resolved it: the pass's own
    max_loss, else compile's); `measured_at` names the input shapes."""
    if bound is None:
        return
    for loss in verification.loss:
        exceeded = bound.violation(loss)
        if exceeded:
            raise PassError(
                f"pass '{p.spec()}' lost more than max_loss allows and was rolled back: output {loss.index} has "
                f"{exceeded} against the graph before (bound: {bound}; measured over {measured_at}). Raise "
                f"max_loss, or choose a less lossy setting (more bits, a smaller ratio, fewer targets). The input "
                f"graph is unchanged.", pass_name=p.name)


def _bug_message(p: "Pass", against: str, check: ShapeCheck, node: str | None, block: str | None = None) -> str:
    what = ("what it claims to compute (its semantics: the graph before with the weights it chose)"
            if against == "semantics" else "the graph before (it claims to be exact)")
    where = f"; first diverging node: '{node}'" if node else ""
    if block:  # a streamed graph is checked a block at a time: the block is what can be named
        return (f"pass '{p.spec()}' does not compute {what} at input shape {check.shapes} first in block "
                f"'{block}' and was rolled back: {check.check.describe()}. This is a bug in the pass, not loss. "
                f"The input graph is unchanged.")
    return (f"pass '{p.spec()}' does not compute {what} at input shape {check.shapes} and was rolled back: "
            f"{check.check.describe()}{where}. This is a bug in the pass, not loss. The input graph is unchanged.")


__all__ = ["Verification", "ShapeCheck", "verify_pass", "verify_chain", "outputs_of_before"]
