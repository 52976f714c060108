"""Running passes: `Pipeline` runs passes one at a time, each on a copy of the graph, and
verifies each result (`passes/verification.py`): against what the pass claims to compute (the
graph before for exact passes, the pass's `Semantics` for lossy ones) at the example inputs and
at a second shape, and measures its loss against the graph before. A pass that raises or fails
the check is rolled back: the error names the pass, the output with the largest error and the
first node whose value diverged. `PipelineReport` holds one `PassRecord` per pass run.
Consecutive exact passes are verified with one check (`passes/chained_verification.py`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from fxforge.errors import FxforgeError, PassError, PassSpecError
from fxforge.ir.graph import finalize, format_bytes, summarize
from fxforge.ir.verify import LossBound, OutputError
from fxforge.passes.base import Pass
from fxforge.passes.chained_verification import PassChain
from fxforge.passes.compatibility import check_composition
from fxforge.passes.context import PassContext
from fxforge.passes.cow import SharedTensorGuard, new_tensor_bytes, peak_rss_bytes, release, structural_copy
from fxforge.passes.spec import parse_pass, parse_pipeline
from fxforge.calibration.streaming import streamed
from fxforge.passes.streamed_verification import verify_streamed_pass
from fxforge.passes.verification import Verification, _overrides_verify, forget_outputs, verify_pass

__all__ = ["Pipeline", "PipelineReport", "PassRecord", "run_pass", "dump"]


@dataclass
class PassRecord:
    """One row of the pipeline report.

    max_error: the largest max abs change of any output against the graph before (the loss).
    loss: per output, its loss against the graph before (max_abs, rel_l2, cosine), the worst
        over the verified shapes; empty when verification was off.
    check_error: the largest max abs difference from what the pass claims (its bug check).
    verified_against: "graph before" (exact passes), "semantics" (lossy ones) or "" (not verified).
    verified_shapes: the input shapes verification ran at ("2x16, 2x16").
    verification_note: e.g. "static graph: verified at the example inputs only".
    verify_seconds: the part of `seconds` spent verifying.
    new_tensor_bytes: bytes of the result's tensors not shared with the graph before (what the
        pass allocated and kept: passes rewrite a copy that shares every tensor they leave alone).
    peak_rss_growth: how much the process's peak RSS rose while the pass ran and was verified
        (0 when it stayed under an earlier peak): its transient memory cost.
    """

    name: str
    spec: str
    seconds: float
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    sites: int
    max_error: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    loss: list[OutputError] = field(default_factory=list)
    check_error: float = 0.0
    verified_against: str = ""
    verified_shapes: list[str] = field(default_factory=list)
    verification_note: str = ""
    verify_seconds: float = 0.0
    new_tensor_bytes: int = 0
    peak_rss_growth: int = 0

    @property
    def rel_l2(self) -> float:
        """The largest relative L2 loss of any output (0 when not verified)."""
        return max((o.rel_l2 for o in self.loss), default=0.0)

    @property
    def cosine(self) -> float:
        """The lowest cosine of any output to the graph before (1 when not verified)."""
        return min((o.cosine for o in self.loss), default=1.0)


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)

    def __str__(self) -> str:
        header = (f"{'pass':<28}{'time':>8}{'nodes':>14}{'param bytes':>24}{'sites':>7}"
                  f"{'loss: max abs':>15}{'rel L2':>10}{'cosine':>10}{'vs claim':>10}{'new tensors':>13}{'peak RSS +':>12}")
        lines = [header, "-" * len(header)]
        for r in self.records:
            lines.append(
                f"{r.spec[:27]:<28}{r.seconds:>7.2f}s{r.nodes_before:>6} → {r.nodes_after:<5}"
                f"{format_bytes(r.bytes_before):>11} → {format_bytes(r.bytes_after):<10}"
                f"{r.sites:>7}{r.max_error:>15.2e}{r.rel_l2:>10.2e}{r.cosine:>10.6f}{r.check_error:>10.1e}"
                f"{format_bytes(r.new_tensor_bytes):>13}{format_bytes(r.peak_rss_growth):>12}"
            )
            if r.verified_against:
                lines.append(f"    verified against {r.verified_against} at {' and '.join(r.verified_shapes)}"
                             + (f" ({r.verification_note})" if r.verification_note else ""))
            for where, why in r.skipped[:10]:
                lines.append(f"    skipped {where}: {why}")
            if len(r.skipped) > 10:
                lines.append(f"    ... and {len(r.skipped) - 10} more skipped")
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.records]

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)


class Pipeline:
    """An ordered list of passes, built from Pass objects, names, or a pipeline string.

    >>> Pipeline("canonicalize,quantize(bits=4,group_size=128)")
    >>> Pipeline([Canonicalize(), Quantize(bits=4)])
    """

    def __init__(self, passes: str | Sequence[Pass | str] = ()):
        if isinstance(passes, str):
            self.passes: list[Pass] = parse_pipeline(passes)
        else:
            self.passes = [parse_pass(p) if isinstance(p, str) else p for p in passes]
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PassSpecError(f"pipeline items must be fxforge passes or pass specs, got {p!r}")
        check_composition(self.passes)  # a pair that cannot compose fails here, before any work

    def __repr__(self) -> str:
        return f"Pipeline({self.spec()!r})"

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, gm: GraphModule, ctx: PassContext, verify: bool = True,
            report: PipelineReport | None = None,
            max_loss: LossBound | float | dict[str, float] | None = None) -> tuple[GraphModule, PipelineReport]:
        """Run every pass on a copy of `gm` (never mutated); return the result and the report.

        max_loss bounds every pass's loss against the graph before it (a pass's own `max_loss`
        wins); None: loss is measured and reported, not bounded.
        """
        report = report if report is not None else PipelineReport()
        bound = LossBound.parse(max_loss)
        dump_dir = os.environ.get("FXFORGE_DUMP")
        given = gm
        # consecutive exact passes are verified with one check (passes/chained_verification.py)
        chain = PassChain() if verify else None
        intermediates: list[GraphModule] = []
        for index, p in enumerate(self.passes):
            try:
                result = run_pass(p, gm, ctx, verify=verify, report=report, max_loss=bound, chain=chain)
            except BaseException:
                if chain is not None:
                    chain.flush()  # a wrong earlier pass is the error to report, not what it made fail
                raise
            if gm is not given and result is not gm:
                intermediates.append(gm)
            gm = result
            if chain is None or not chain.links:
                for old in intermediates:  # graphs of ours no check needs: their replaced tensors go now
                    release(old)
                intermediates.clear()
            if dump_dir:
                dump(gm, Path(dump_dir), len(report.records), p)
        if chain is not None:
            chain.flush()
        for old in intermediates:
            release(old)
        forget_outputs(gm)  # kept for the next pass's check; there is none
        return gm, report


def run_pass(p: Pass, gm: GraphModule, ctx: PassContext, verify: bool = True,
             report: PipelineReport | None = None,
             max_loss: LossBound | float | dict[str, float] | None = None,
             chain: PassChain | None = None) -> GraphModule:
    """Run one pass on a copy of `gm`, verify it, and append its record to `report`.

    Verification (`passes/verification.py`): the result must match what the pass claims within
    `p.tolerance()` at the example inputs and at a second shape; its loss against `gm` is
    measured, and bounded by `p.max_loss`, else `max_loss`, when set.
    A pass that changes the graph's inputs hands back new example inputs
    (`PassResult.example_inputs`); they replace `ctx.example_inputs` once it is verified.
    chain (from `Pipeline.run`): an exact pass joins it and is verified with the passes after it
    (`passes/chained_verification.py`); any other pass first has the chain verified.
    """
    try:  # a malformed bound is an error before any work, not after the pass ran
        bound = p.loss_bound() or LossBound.parse(max_loss)
    except PassSpecError as exc:
        raise PassSpecError(f"pass '{p.spec()}': {exc}") from exc
    before = summarize(gm)
    start = time.perf_counter()
    rss_start = peak_rss_bytes()
    # Copy-on-write (passes/cow.py): the pass rewrites a structural copy sharing gm's tensors;
    # rolling it back is dropping the copy. The guard catches a pass writing a shared tensor.
    guard = SharedTensorGuard.of(gm)
    work = structural_copy(gm)
    after_gm: GraphModule | None = None
    try:
        try:
            with torch.no_grad():
                result = p.run(work, ctx)
            after_gm = finalize(result.graph_module)
        except Exception as exc:  # a bug or an unforeseen input: name the pass that hit it
            guard.check(p.spec(), p.name)  # an in-place write is the real bug, whatever followed it
            if isinstance(exc, FxforgeError):
                raise  # already says what went wrong and where (a PassError, a CalibrationError, ...)
            raise PassError(
                f"pass '{p.spec()}' failed and was rolled back: {type(exc).__name__}: {exc}",
                pass_name=p.name,
            ) from exc
        guard.check(p.spec(), p.name)
        verification, verify_seconds = Verification(), 0.0
        deferred = chain is not None and verify and chain.joins(p, gm, result, ctx, bound)
        if chain is not None and not deferred:
            chain.flush()  # the chain's last result is this pass's graph before: verified first
        if verify and ctx.example_inputs and not deferred:
            verify_start = time.perf_counter()
            if streamed(gm) is not None and not _overrides_verify(p):  # one block's weights at a time
                verification = verify_streamed_pass(p, gm, after_gm, result, ctx, max_loss=bound)
            else:
                verification = verify_pass(p, gm, after_gm, result, ctx, max_loss=bound)
            verify_seconds = time.perf_counter() - verify_start
    except BaseException:
        for dropped in (work, after_gm):  # rolled back: the copy's new tensors go now
            if dropped is not None and dropped is not gm:
                release(dropped)
        raise
    if work is not after_gm:
        release(work)  # a pass that built a new GraphModule leaves its copy behind
    elapsed = time.perf_counter() - start
    after = summarize(after_gm)
    record = PassRecord(
        name=p.name, spec=p.spec(), seconds=elapsed,
        nodes_before=before.nodes, nodes_after=after.nodes,
        bytes_before=before.total_param_bytes, bytes_after=after.total_param_bytes,
        sites=result.sites, max_error=max((o.max_abs for o in verification.loss), default=0.0),
        skipped=list(result.skipped), notes=dict(result.notes), loss=verification.loss,
        check_error=verification.check_error,
        verified_against=verification.against if verification.checks else "",
        verified_shapes=[c.shapes for c in verification.checks],
        verification_note=verification.note, verify_seconds=verify_seconds,
        new_tensor_bytes=new_tensor_bytes(gm, after_gm),
        peak_rss_growth=max(0, peak_rss_bytes() - rss_start),
    )
    if report is not None:
        report.records.append(record)
    if deferred:  # verified with the passes after it (or now, if it closes the chain): fills `record`
        chain.add(p, gm, after_gm, result, ctx, record, report)
    result.semantics = None  # the claimed tensors die with the check, not with the report
    if result.example_inputs is not None:
        ctx.example_inputs = tuple(result.example_inputs)  # only now: a rolled-back pass leaves ctx as it was
    return after_gm


def dump(gm: GraphModule, directory: Path, index: int, p: Pass) -> None:
    """Write `gm`'s code after pass number `index` to `directory` (FXFORGE_DUMP=dir turns this on)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    (directory / f"{index:02d}_{p.name}.py").write_text(f"# after pass {p.spec()}\n{text}")
