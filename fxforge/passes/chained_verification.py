"""Verifying a run of consecutive exact passes with one check (`PassChain`), used by `Pipeline.run`.

Why: an exact pass's check runs its result at every verification shape (the graph before it
was already run by the previous check). In `canonicalize,quantize(bits=4),fuse_projections,
fuse_attention,add_kv_cache` the three exact passes after quantize each ran the quantized
decoder twice (add_kv_cache four times): more than a third of the CLI compile. Exact passes
compose: if each pass computes the graph before it, the last one's result computes the graph
before the first, so the chain is checked once, the last result against the graph before the
first, and each pass's result is no longer run.

What stays the same:
- A wrong pass is still rejected and named: when the chain's check fails, each pass is checked
  alone (`verify_pass`, as without chaining: the first wrong one is named, with its diverging
  node), and a pass whose successor crashes is checked before the crash is reported.
- Only passes that claim exactness join: no semantics, no loss bound, not on a streamed graph,
  no activation rounding in the graph, inputs unchanged. A pass with its own `verify` joins only
  if it declares `verify_accepts_earlier_graph` (its verify reads no more of `before` than its
  outputs, e.g. add_kv_cache); it then closes the chain (it changes the graph's inputs), and its
  own comparison (its own tolerance) judges the chain.
- The chain's tolerance is the sum of its passes' tolerances (errors of exact passes add up; a
  bound only one pass sets bounds nothing about the others): a chain of correct passes passes.
  A pass whose error exceeds its own tolerance but stays within the sum goes unnoticed; a bug
  (a wrong weight, split or mask) moves outputs by orders of magnitude more.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch.fx import GraphModule

from fxforge.calibration.streaming import streamed
from fxforge.ir.activation_rounding import rounding_ops
from fxforge.ir.verify import Comparison, LossBound, Tolerance
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.cow import peak_rss_bytes
from fxforge.passes.verification import Verification, _overrides_verify, verify_chain, verify_pass

if TYPE_CHECKING:
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import PassRecord, PipelineReport

__all__ = ["PassChain", "chain_tolerance"]


def chain_tolerance(tolerances: list[Tolerance]) -> Tolerance | None:
    """The bound the composition of passes each within its tolerance meets (None: none holds)."""
    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]

    cosines = [t.min_cosine for t in tolerances]
    min_cosine = None
    if all(c is not None for c in cosines):  # angles add up: θ ≤ Σ θ_i
        angle = sum(math.acos(max(-1.0, min(1.0, c))) for c in cosines)  # type: ignore[arg-type]
        min_cosine = math.cos(min(math.pi, angle))
    tol = Tolerance(max_abs=total([t.max_abs for t in tolerances]), rtol=sum(t.rtol for t in tolerances),
                    max_rel=total([t.max_rel for t in tolerances]), min_cosine=min_cosine)
    return tol if (tol.max_abs, tol.max_rel, tol.min_cosine) != (None, None, None) else None


@dataclass(frozen=True)
class _ChainCheck(Pass):
    """Stands for the chain in `verify_chain`: its tolerance, its float-math flag."""

    name: ClassVar[str] = "chain"
    passes: tuple[Pass, ...] = ()
    bound: Tolerance = field(default_factory=Tolerance)

    def tolerance(self) -> Tolerance:
        return self.bound

    @property
    def reorders_float_math(self) -> bool:  # type: ignore[override]
        return any(p.reorders_float_math for p in self.passes)

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)


@dataclass(frozen=True)
class _ChainClosedByVerify(_ChainCheck):
    """A chain whose last pass compares its own way (`verify_accepts_earlier_graph`)."""

    def verify(self, before: GraphModule, after: GraphModule, ctx: "PassContext") -> Comparison:
        return self.passes[-1].verify(before, after, ctx)


@dataclass
class _Link:
    p: Pass
    before: GraphModule
    after: GraphModule
    result: PassResult
    ctx: "PassContext"      # a copy holding the example inputs the pass ran with
    record: "PassRecord"
    report: "PipelineReport | None"  # holds `record`, removed from it if the pass is rolled back


@dataclass
class PassChain:
    """Exact passes run but not yet verified, in order; `flush` verifies them."""

    links: list[_Link] = field(default_factory=list)

    def joins(self, p: Pass, before: GraphModule, result: PassResult, ctx: "PassContext",
              bound: LossBound | None) -> bool:
        """Whether `p`'s result may be verified as part of a chain (module docstring)."""
        if bound is not None or not ctx.example_inputs or streamed(before) is not None:
            return False
        if result.semantics is not None or type(p).semantics is not Pass.semantics:
            return False
        if _overrides_verify(p):
            return bool(getattr(p, "verify_accepts_earlier_graph", False))
        return result.example_inputs is None and not rounding_ops(before)

    def add(self, p: Pass, before: GraphModule, after: GraphModule, result: PassResult, ctx: "PassContext",
            record: "PassRecord", report: "PipelineReport | None" = None) -> None:
        self.links.append(_Link(p, before, after, result, dataclasses.replace(ctx), record, report))
        if _overrides_verify(p):  # it changes the graph's inputs: nothing after it can share the check
            self.flush()

    def holds(self, gm: GraphModule) -> bool:
        return any(gm is link.before or gm is link.after for link in self.links)

    def flush(self) -> None:
        """Verify the pending passes and fill their report records; PassError names a wrong one."""
        links, self.links = self.links, []
        if not links:
            return
        start, rss_start = time.perf_counter(), peak_rss_bytes()
        tol = chain_tolerance([link.p.tolerance() for link in links])
        verification = None
        if len(links) > 1 and tol is not None:
            kind = _ChainClosedByVerify if _overrides_verify(links[-1].p) else _ChainCheck
            check = kind(passes=tuple(link.p for link in links), bound=tol)
            verification = verify_chain(check, links[0].before, links[-1].after, links[-1].result, links[0].ctx)
        if verification is not None:
            names = [link.p.name for link in links]
            note = (f"verified as one chain ({', '.join(names)}): the last result against the graph before "
                    f"'{names[0]}', within the sum of their tolerances; loss and error are the chain's")
            _fill([link.record for link in links], verification, "; ".join(filter(None, [note, verification.note])),
                  time.perf_counter() - start)
            links[-1].record.peak_rss_growth = max(links[-1].record.peak_rss_growth, peak_rss_bytes() - rss_start)
            return
        for index, link in enumerate(links):  # one pass, or the chain failed: each alone names the wrong one
            link_start = time.perf_counter()
            try:
                verification = verify_pass(link.p, link.before, link.after, link.result, link.ctx)
            except BaseException:
                for rolled_back in links[index:]:  # no row for a pass that failed or came after it
                    if rolled_back.report is not None:
                        records = rolled_back.report.records
                        records[:] = [r for r in records if r is not rolled_back.record]
                raise
            _fill([link.record], verification, verification.note, time.perf_counter() - link_start)
            link.record.peak_rss_growth = max(link.record.peak_rss_growth, peak_rss_bytes() - rss_start)


def _fill(records: list["PassRecord"], verification: Verification, note: str, seconds: float) -> None:
    """Write a verification into records made before it ran; its time goes to the last record."""
    for record in records:
        record.loss = verification.loss
        record.max_error = max((o.max_abs for o in verification.loss), default=0.0)
        record.check_error = verification.check_error
        record.verified_against = verification.against if verification.checks else ""
        record.verified_shapes = [c.shapes for c in verification.checks]
        record.verification_note = note
    records[-1].verify_seconds += seconds
    records[-1].seconds += seconds

