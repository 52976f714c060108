"""Numerical checks between two graphs (or a graph and a reference) that should agree.

The pipeline uses these after every pass; backends use them to check a lowered model against
eager. A `Tolerance` states what "agree" means for a pass: exact passes keep tight absolute
bounds; lossy passes (quantization, pruning) are checked tightly against their own semantics
(`fxforge.ir.reference`), and their loss against the graph before is measured (`measure_loss`)
and bounded only where the user asks (`LossBound`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule

from fxforge.errors import PassSpecError
from fxforge.ir.scratch import scratch_buffers


@dataclass(frozen=True)
class Tolerance:
    """Bounds two outputs must meet; every bound that is set must hold.

    max_abs: max |a - b| ≤ max_abs + rtol·|b|, elementwise (the default: exact passes).
    max_rel: ‖a - b‖₂ / ‖b‖₂ ≤ max_rel (lossy passes).
    min_cosine: cosine(a, b) over all elements ≥ min_cosine.
    """

    max_abs: float | None = 1e-5
    rtol: float = 1e-5
    max_rel: float | None = None
    min_cosine: float | None = None

    @staticmethod
    def lossy(max_rel: float | None = None, min_cosine: float | None = None) -> "Tolerance":
        return Tolerance(max_abs=None, max_rel=max_rel, min_cosine=min_cosine)


# The tolerances lowerings declare (`register_lowering(..., tolerance=...)`), chosen by
# measurement on every op's sample_inputs (tests/ir/test_every_op_every_backend.py):
# FLOAT32_REORDERED: the lowering does the reference's float32 arithmetic, summed in another
#   order (a fused kernel, ORT's MatMul): measured at most 2e-6 abs on outputs up to 20 and
#   8e-6 on outputs up to 72 (relative L2 <= 1.2e-7), so 1e-5 abs + 1e-5 relative leaves 5x room
#   while a wrong scale, group or mask moves outputs by far more.
# BIT_EXACT: the lowering is defined to compute exactly what the reference computes (integer
#   products, ORT's own rounding order replicated by the reference): any difference is a bug.
FLOAT32_REORDERED = Tolerance(max_abs=1e-5, rtol=1e-5)
BIT_EXACT = Tolerance(max_abs=0.0, rtol=0.0)


@dataclass
class OutputError:
    index: int
    max_abs: float
    rel_l2: float
    cosine: float
    ok: bool
    reason: str = ""


@dataclass
class Comparison:
    outputs: list[OutputError] = field(default_factory=list)
    structural: str = ""  # non-empty when the outputs differ in number, shape or dtype

    @property
    def ok(self) -> bool:
        return not self.structural and all(o.ok for o in self.outputs)

    @property
    def max_error(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def worst(self) -> OutputError | None:
        bad = [o for o in self.outputs if not o.ok] or self.outputs
        return max(bad, key=lambda o: o.rel_l2, default=None)

    def describe(self) -> str:
        if self.structural:
            return self.structural
        w = self.worst
        if w is None:
            return "no outputs compared"
        return (f"output {w.index} has max abs error {w.max_abs:.3g}, relative L2 error "
                f"{w.rel_l2:.3g}, cosine {w.cosine:.6f} ({w.reason})")


def run_graph(gm: GraphModule, inputs: Sequence[Any]) -> list[Any]:
    """Run `gm` on flat inputs without gradients; return its flat outputs as a list.
    Packed-weight ops dequantize into reused buffers meanwhile (`fxforge.ir.scratch`)."""
    with torch.no_grad(), scratch_buffers():
        out = gm(*inputs)
    return list(pytree.tree_leaves(out))


def compare_tensors(ref: torch.Tensor, got: torch.Tensor, tol: Tolerance, index: int = 0) -> OutputError:
    """Errors of `got` against `ref` (statistics in float64) and whether they are within `tol`.

    Two float64 copies and one difference, every statistic a reduction over them: the checks of
    a pipeline compare logits (batch x sequence x vocabulary) several times per pass, and a
    temporary per statistic made this 2.5x slower (55 vs 22 ms for 2M logits)."""
    if not (ref.dtype.is_floating_point or ref.dtype.is_complex):
        tol = Tolerance(max_abs=0.0, rtol=0.0)  # integer outputs (token ids, ...) must match exactly
    r, g = ref.detach().double(), got.detach().double()
    diff = torch.sub(g, r)
    max_abs = 0.0
    if diff.numel():  # one pass, no |diff| temporary (vector_norm(ord=inf) is 5x slower)
        low, high = torch.aminmax(diff)
        max_abs = max(abs(float(low)), abs(float(high)))
    ref_norm = float(torch.linalg.vector_norm(r))
    got_norm = float(torch.linalg.vector_norm(g))
    rel = float(torch.linalg.vector_norm(diff)) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    denom = ref_norm * got_norm
    cosine = float(torch.dot(r.reshape(-1), g.reshape(-1))) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    reasons = []
    # float32/16 values squared and summed cannot overflow float64: a non-finite norm is a NaN/inf
    if not math.isfinite(got_norm):
        reasons.append("non-finite values")
    # |g - r| > max_abs + rtol |r| somewhere needs max |g - r| > max_abs: elementwise only then
    if tol.max_abs is not None and not max_abs <= tol.max_abs and bool(
            (diff.abs_() > tol.max_abs + tol.rtol * r.abs()).any()):
        reasons.append(f"max abs error above {tol.max_abs:g} (+ rtol {tol.rtol:g})")
    if tol.max_rel is not None and rel > tol.max_rel:
        reasons.append(f"relative error above {tol.max_rel:g}")
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        reasons.append(f"cosine below {tol.min_cosine:g}")
    return OutputError(index=index, max_abs=max_abs, rel_l2=rel, cosine=cosine,
                       ok=not reasons, reason="; ".join(reasons) or "within tolerance")


def compare_outputs(ref: Sequence[Any], got: Sequence[Any], tol: Tolerance,
                    allow_extra_outputs: bool = True) -> Comparison:
    """Compare flat output lists; `got` may have extra trailing outputs (e.g. Medusa heads)."""
    comparison = Comparison()
    if len(got) < len(ref) or (len(got) != len(ref) and not allow_extra_outputs):
        comparison.structural = f"expected {len(ref)} outputs, got {len(got)}"
        return comparison
    for i, (r, g) in enumerate(zip(ref, got)):
        if not isinstance(r, torch.Tensor):
            if r != g:
                comparison.structural = f"output {i}: expected {r!r}, got {g!r}"
            continue
        if not isinstance(g, torch.Tensor) or g.shape != r.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            comparison.structural = f"output {i}: expected shape {tuple(r.shape)}, got {shape}"
            return comparison
        comparison.outputs.append(compare_tensors(r, g, tol, i))
    return comparison


def low_precision_tolerance(tol: Tolerance, dtype: torch.dtype) -> Tolerance:
    """`tol` for outputs of a 16-bit dtype compared with a reference computed differently.

    fp32 references agree with fxforge ops to rounding (~1e-7), but a bf16/fp16 reference
    rounds its weights and products to 16 bits where the op accumulates in fp32: they differ by
    a few units of the dtype's epsilon, relative. 8 eps (bf16: 6%, fp16: 0.8%) of relative L2
    still rejects a misplaced group or layer, whose error is of the size of the weights.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return tol
    return Tolerance(max_abs=None, max_rel=8 * torch.finfo(dtype).eps)


LOSS_METRICS = ("max_abs", "rel_l2", "min_cosine")


@dataclass(frozen=True)
class LossBound:
    """A user's bound on how far a pass may move the outputs (loss, not bugs); unset = no bound.

    max_abs: max |after - before| over any output element.
    rel_l2: ‖after - before‖₂ / ‖before‖₂ per output.
    min_cosine: cosine(after, before) per output, at least.
    """

    max_abs: float | None = None
    rel_l2: float | None = None
    min_cosine: float | None = None

    @staticmethod
    def parse(value: "LossBound | float | dict[str, float] | None") -> "LossBound | None":
        """None -> no bound; a number -> a bound on rel_l2; a dict -> per metric (LOSS_METRICS).

        Anything else is a PassSpecError (a ValueError) naming the accepted forms."""
        if value is None or isinstance(value, LossBound):
            return value
        if isinstance(value, bool):
            raise PassSpecError(f"max_loss must be a number (bound on relative L2 error) or a dict over "
                             f"{LOSS_METRICS}, got {value!r}")
        if isinstance(value, (int, float)):
            value = {"rel_l2": float(value)}
        if not isinstance(value, dict):
            raise PassSpecError(f"max_loss must be a number (bound on relative L2 error) or a dict over "
                             f"{LOSS_METRICS}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(LOSS_METRICS))
        if unknown:
            raise PassSpecError(f"max_loss: unknown metric(s) {unknown}; use {LOSS_METRICS}, e.g. "
                             f"{{'rel_l2': 0.3, 'min_cosine': 0.95}}")
        for key, bound in value.items():
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
                raise PassSpecError(f"max_loss: {key} must be a number, got {bound!r}")
            if key != "min_cosine" and bound < 0:
                raise PassSpecError(f"max_loss: {key} must be >= 0, got {bound!r}")
        return LossBound(**{k: float(v) for k, v in value.items()})

    def violation(self, loss: OutputError) -> str | None:
        """'rel_l2 = 0.41 > 0.3' for the first metric of `loss` beyond this bound, else None."""
        if self.max_abs is not None and not loss.max_abs <= self.max_abs:
            return f"max_abs = {loss.max_abs:.4g} > {self.max_abs:g}"
        if self.rel_l2 is not None and not loss.rel_l2 <= self.rel_l2:
            return f"rel_l2 = {loss.rel_l2:.4g} > {self.rel_l2:g}"
        if self.min_cosine is not None and not loss.cosine >= self.min_cosine:
            return f"cosine = {loss.cosine:.6f} < {self.min_cosine:g}"
        return None

    def __str__(self) -> str:
        parts = [f"{k} <= {v:g}" for k, v in (("max_abs", self.max_abs), ("rel_l2", self.rel_l2)) if v is not None]
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return ", ".join(parts) or "no bound"


def measure_loss(before: Sequence[Any], after: Sequence[Any]) -> Comparison:
    """Per-output max abs, relative L2 and cosine of `after` against `before`; nothing bounded."""
    return compare_outputs(before, after, Tolerance(max_abs=None))


def worst_loss(comparisons: Sequence[Comparison]) -> list[OutputError]:
    """Per output index, the worst of several measurements (e.g. at two shapes)."""
    worst: dict[int, OutputError] = {}
    for comparison in comparisons:
        for o in comparison.outputs:
            w = worst.get(o.index)
            worst[o.index] = o if w is None else OutputError(
                index=o.index, max_abs=max(w.max_abs, o.max_abs), rel_l2=max(w.rel_l2, o.rel_l2),
                cosine=min(w.cosine, o.cosine), ok=w.ok and o.ok, reason=w.reason if not w.ok else o.reason)
    return [worst[i] for i in sorted(worst)]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "call_function":
            self.values[n.name] = value
        return value


def first_divergent_node(before: GraphModule, after: GraphModule, inputs: Sequence[Any],
                         tol: Tolerance) -> str | None:
    """The first node (in `after`'s order) present in both graphs whose value differs.

    Passes keep the names of nodes they do not touch, so the first surviving node whose value
    moved beyond `tol` points at where the rewrite went wrong. None if none is found.
    """
    rec_before, rec_after = _Recorder(before), _Recorder(after)
    try:
        with torch.no_grad():
            rec_before.run(*inputs)
            rec_after.run(*inputs)
    except Exception:
        return None
    for node in after.graph.nodes:
        ref = rec_before.values.get(node.name)
        got = rec_after.values.get(node.name)
        if not (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor)) or ref.shape != got.shape:
            continue
        if not ref.dtype.is_floating_point:
            continue
        if not compare_tensors(ref, got, tol).ok:
            return node.name
    return None
