"""The Pass base class and what a pass returns (`PassResult`).

A pass is a frozen dataclass whose fields are its options; its `name` equals its file name and
is how pipelines refer to it (`"quantize(bits=4,group_size=128)"`). It is registered by name
(`passes/registry.py`) and run, on a copy of the graph and verified, by `passes/pipeline.py`.
Read `fxforge/passes/README.md` before writing a pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch.fx import GraphModule

from fxforge.ir.reference import Semantics, reference_graph
from fxforge.ir.verify import Comparison, LossBound, Tolerance, compare_outputs, run_graph

if TYPE_CHECKING:
    from fxforge.passes.context import PassContext

__all__ = ["Pass", "PassResult"]


@dataclass
class PassResult:
    """What a pass returns: the rewritten graph and what it did.

    sites: how many places the pass rewrote (the match count reported and tested).
    skipped: (where, why) for every candidate it deliberately left alone.
    notes: anything else worth showing in the report (a chosen alpha, a rank allocation, ...).
    example_inputs: only for passes that change the graph's inputs (e.g. add_kv_cache): flat
        inputs the new graph takes, derived from ctx.example_inputs. Once the pass is verified
        they replace ctx.example_inputs, so later passes verify, and the backend exports and
        checks, on inputs the graph actually takes.
    semantics: for lossy passes, what the result claims to compute as edits of the graph before
        (dequantized or masked weights, ...); verification builds that reference and holds the
        result to it exactly. None: the pass claims to be exact (or overrides `semantics`).
    """

    graph_module: GraphModule
    sites: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    example_inputs: tuple[Any, ...] | None = None
    semantics: Semantics | None = None


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclass as a frozen dataclass and decorate with @register_pass.

    Override:
        run(gm, ctx) -> PassResult      rewrite `gm` (a private structural copy whose tensors are
                                        shared: replace tensors, never write them) in place
                                        or return a new GraphModule.
        tolerance() -> Tolerance        how closely the result must match what the pass claims
                                        (the graph before, or its semantics); default 1e-5.
        reorders_float_math = True      (class attribute) the result computes the same sums in
                                        another order or precision (a fused kernel): on bf16/fp16
                                        outputs the tolerance widens to the dtype's rounding.
        semantics(before, result, ctx)  lossy passes: the graph the result claims to equal;
                                        the default builds it from `result.semantics`.
        verify(before, after, ctx)      only if the pass changes the graph's inputs/outputs.

    Every pass also takes `max_loss=` (keyword only): a bound on its loss against the graph
    before, a number (relative L2 error) or a dict over ("max_abs", "rel_l2", "min_cosine").
    Default None: no bound (the loss is measured and reported), or compile's `max_loss`.
    """

    name: ClassVar[str] = ""
    reorders_float_math: ClassVar[bool] = False
    # What the pipeline checks before running (passes/compatibility.py): the forms of linear
    # layer this pass rewrites ("linear" = float aten.linear, else an fxforge op name such as
    # "linear_wq"; empty: it does not select linear layers), and the form it leaves the layers
    # it selects in (None: unchanged). A pass may make either a property of its options.
    consumes: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[str | None] = None
    # A pass that overrides `verify` and reads no more of `before` there than its outputs (through
    # `outputs_of_before`) sets this: its check then also holds against any earlier graph computing
    # the same, so it may close a chain of exact passes verified at once (passes/chained_verification.py).
    verify_accepts_earlier_graph: ClassVar[bool] = False
    max_loss: float | dict[str, float] | None = field(default=None, kw_only=True, compare=False)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def tolerance(self) -> Tolerance:
        return Tolerance()

    def semantics(self, before: GraphModule, result: PassResult, ctx: PassContext) -> GraphModule | None:
        """The graph this pass's result claims to compute, or None for "the graph before" (exact).

        The default builds it from `result.semantics` (`fxforge.ir.reference.reference_graph`):
        `before` sharing its tensors, with the claimed tensors swapped in.
        """
        if not result.semantics:
            return None
        return reference_graph(before, result.semantics)

    def loss_bound(self) -> LossBound | None:
        """This pass's own bound on its loss (`max_loss=`), or None to use compile's."""
        return LossBound.parse(self.max_loss)

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """Compare outputs of the graphs on the example inputs (extra outputs of `after` ignored).

        The pipeline calls this only where a pass overrides it (passes that change the graph's
        inputs or outputs); otherwise `passes/verification.py` compares against the semantics.
        """
        ref = run_graph(before, ctx.example_inputs)
        got = run_graph(after, ctx.example_inputs)
        return compare_outputs(ref, got, self.tolerance())

    def spec(self) -> str:
        """This pass as a pipeline string: `quantize(bits=4,group_size=128)` (non-defaults only)."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                opts.append(f"{f.name}={value!r}")
        return f"{self.name}({','.join(opts)})" if opts else self.name

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
