"""Pass `shift_add`: linear layers -> fxforge::shift_add_linear (ShiftAddLLM, arXiv 2406.05981).

    aten.linear(x, W, b)  ->  fxforge.shift_add_linear(x, packed, exps, signs, b, group_size)
    with W ≈ Σ_p α_p·B_p, B_p ∈ {-1,+1}, α_p = Σ_t ±2^e_t per group of input columns

so the layer needs only additions (of ±x) and shifts (by the α's powers of two). Methods:
`bcq` fits the weights alone; `bcq_calibrated` also minimizes the output error on calibration
inputs (H = XᵀX/n, GPTQ-style column loop with error feedback). `bit_budget` (an average of
2-4 bits) gives each layer 2, 3 or 4 planes by measured sensitivity: the error each choice
leaves under weight-only BCQ (tr(ΔW·H·ΔWᵀ) with calibration data, ‖ΔW‖² without), upgrading
first the layers whose error falls most per extra stored bit; then each layer is quantized with
`method` at its bits. The algorithm lives in `bcq.py`.

Semantics (verified exactly): the graph before with each rewritten weight replaced by the BCQ
weight Σ_p α_p·B_p the fit chose (`BcqWeight.dequantize`, from the unpacked planes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from torch.fx import GraphModule

from fxforge.calibration.engine import BlockCalibration, calibrate
from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite, add_attr, get_attr, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.ir.ops.shift_add_linear import stored_bits_per_weight
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.methods import Method, method_options, methods_of, register_method
from fxforge.passes.quantize.bcq import BcqWeight, output_error, quantize_bcq, quantize_bcq_calibrated
from fxforge.passes.selection import LayerSelection

BUDGET_CHOICES = (2, 3, 4)
# Output cosine to the float model the tests expect on the example inputs, by the fewest planes
# any layer gets: tiny random-init zoo models lose more than trained ones, so these are floors
# of honest loss, not quality targets (the bench measures quality). Verification no longer uses
# them: it checks the result against its semantics; pass max_loss={"min_cosine": ...} to bound.
MIN_COSINE = {1: 0.3, 2: 0.8, 3: 0.9, 4: 0.95}


@register_method("shift_add")
@dataclass(frozen=True)
class Bcq(Method):
    """shift_add(method=bcq): BCQ fitted to the weights alone (data-free)."""

    name = "bcq"

    def fit(self, weight: Tensor, hessian: Tensor | None, bits: int, group_size: int, terms: int,
            iters: int) -> BcqWeight:
        return quantize_bcq(weight, bits, group_size, terms, iters)


@register_method("shift_add")
@dataclass(frozen=True)
class BcqCalibrated(Method):
    """shift_add(method=bcq_calibrated): BCQ minimizing the output error on calibration inputs
    (H = XᵀX/n of the layer's inputs, GPTQ-style error feedback); calibrated block by block."""

    name = "bcq_calibrated"
    needs_calibration = True
    statistics = ("gram",)

    def fit(self, weight: Tensor, hessian: Tensor | None, bits: int, group_size: int, terms: int,
            iters: int) -> BcqWeight:
        return quantize_bcq_calibrated(weight, hessian, bits, group_size, terms, iters)


@register_pass
@dataclass(frozen=True)
class ShiftAdd(Pass):
    """Reparameterize linear layers as sign planes and power-of-two scales.

    bits: sign planes per weight (1-8); ignored when `bit_budget` is set.
    group_size: input columns sharing one set of scales (a multiple of 8 dividing each layer's
        input size; -1 = the whole row).
    method: "bcq" (weights only) or "bcq_calibrated" (needs calibration data).
    apot_terms: powers of two per scale (1-8).
    bit_budget: average planes per weight over the targeted layers (2.0-4.0), or None.
    targets / exclude: module-path patterns (fnmatch, suffix semantics) choosing the layers.
    iters: alternating refinement steps of the BCQ fit.
    calibration_batches: how many calibration items to read for the Hessians.
    """

    name = "shift_add"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    produces = "shift_add_linear"
    bits: int = 3
    group_size: int = 128
    method: Literal["bcq", "bcq_calibrated"] = "bcq"
    apot_terms: int = 3
    bit_budget: float | None = None
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    iters: int = 10
    calibration_batches: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"shift_add: bits={self.bits} is out of range; use 1 to 8 sign planes")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(
                f"shift_add: group_size={self.group_size} must be a positive multiple of 8 (one lookup-table "
                f"byte holds 8 signs) or -1 for whole rows"
            )
        if self.method not in methods_of("shift_add"):
            raise ValueError(f"shift_add: method={self.method!r} is unknown; use 'bcq' or 'bcq_calibrated'")
        if not 1 <= self.apot_terms <= 8:
            raise ValueError(f"shift_add: apot_terms={self.apot_terms} is out of range; use 1 to 8")
        if self.bit_budget is not None and not BUDGET_CHOICES[0] <= self.bit_budget <= BUDGET_CHOICES[-1]:
            raise ValueError(
                f"shift_add: bit_budget={self.bit_budget} is out of range; layers get {BUDGET_CHOICES} planes, "
                f"so the average must lie in [{BUDGET_CHOICES[0]}, {BUDGET_CHOICES[-1]}]"
            )
        if self.iters < 0 or self.calibration_batches < 1:
            raise ValueError("shift_add: iters must be >= 0 and calibration_batches >= 1")

    def expected_cosine(self) -> float:
        """The output cosine floor (MIN_COSINE) of this setting on the tiny zoo models."""
        fewest = BUDGET_CHOICES[0] if self.bit_budget is not None else self.bits
        return MIN_COSINE.get(fewest, 0.95)

    def _group(self, site: LinearSite) -> int:
        return site.in_features if self.group_size == -1 else self.group_size

    def _check_sites(self, sites: list[LinearSite]) -> None:
        for site in sites:
            g = self._group(site)
            if site.in_features % g == 0 and g % 8 == 0:
                continue
            if self.group_size == -1:
                problem = (f"'{site.module_path}' has {site.in_features} input features, not a multiple of 8 "
                           f"(one lookup-table byte holds 8 signs), so whole-row groups cannot be packed")
            else:
                problem = f"group_size={g} does not divide the {site.in_features} input features of '{site.module_path}'"
            raise PassError(
                f"pass 'shift_add': {problem}. Choose a group size that divides every targeted layer, or exclude "
                f"this layer (exclude=('{site.module_path.rsplit('.', 1)[-1]}',)). The model is unchanged.",
                pass_name=self.name,
                node=site.node.name,
            )

    def method_object(self) -> Bcq | BcqCalibrated:
        return method_options("shift_add", self.method, {})

    def _quantize(self, site: LinearSite, gm: GraphModule, bits: int, hessian) -> BcqWeight:
        weight = get_attr(gm, site.weight_name)
        return self.method_object().fit(weight, hessian, bits, self._group(site), self.apot_terms, self.iters)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        self._check_sites(sites)
        method = self.method_object()
        if method.needs_calibration:
            ctx.require_calibration(self.name, method=self.method)
        calibrated = bool(sites) and ctx.calibration is not None and (method.needs_calibration or self.bit_budget)
        requests = {s.node: ("gram",) for s in sites}
        chosen: dict[str, BcqWeight] = {}
        notes: dict = {}
        op = get_op("shift_add_linear").overload
        semantics = Semantics()
        if self.bit_budget is not None:
            hessians = {}
            if calibrated:
                # the allocation compares every layer's sensitivity: one sweep, nothing rewritten yet
                run = calibrate(gm, ctx, requests, pass_name=self.name, method=self.method,
                                max_batches=self.calibration_batches)
                hessians = {name: self._hessian(stats) for name, stats in run.statistics.items()}
            chosen, allocation = self._allocate(gm, sites, hessians, ctx)
            notes["bits"] = allocation
            self._emit(gm, sites, chosen, op, semantics)
        elif calibrated:
            by_node = {s.node: s for s in sites}

            def rewrite_block(block: BlockCalibration) -> None:  # block i sees blocks < i already in BCQ
                block_sites = [by_node[n] for n in block.nodes]
                for site in ctx.progress(block_sites, desc=f"shift_add {block.name}"):
                    chosen[site.node.name] = self._quantize(site, gm, self.bits, self._hessian(block.stats(site.node)))
                self._emit(gm, block_sites, chosen, op, semantics)

            calibrate(gm, ctx, requests, rewrite_block, pass_name=self.name, method=self.method,
                      max_batches=self.calibration_batches)
        else:
            for site in ctx.progress(sites, desc="shift_add"):
                chosen[site.node.name] = self._quantize(site, gm, self.bits, None)
            self._emit(gm, sites, chosen, op, semantics)
        total = sum(s.in_features * s.out_features for s in sites)
        if total:
            stored = sum(
                s.in_features * s.out_features
                * stored_bits_per_weight(chosen[s.node.name].bits, self._group(s), self.apot_terms)
                for s in sites)
            notes["avg_planes"] = sum(s.in_features * s.out_features * chosen[s.node.name].bits for s in sites) / total
            notes["stored_bits_per_weight"] = stored / total
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, notes=notes, semantics=semantics)

    def _hessian(self, stats):
        if stats.rows == 0:
            raise PassError("pass 'shift_add': the calibration data yielded no batches; pass at least one "
                            "model input as calibration", pass_name=self.name)
        return stats.hessian

    def _emit(self, gm: GraphModule, sites: list[LinearSite], chosen: dict[str, BcqWeight], op,
              semantics: Semantics) -> None:
        """Replace each site's linear by shift_add_linear on its chosen BCQ weight."""
        for site in sites:
            result = chosen[site.node.name]
            semantics.replace_weight(site.weight_name, result.dequantize())
            base = site.module_path or site.weight_name
            packed = add_attr(gm, f"{base}.sa_packed", result.packed(), buffer=True, before=site.node)
            exps = add_attr(gm, f"{base}.sa_exps", result.exps, buffer=True, before=site.node)
            signs = add_attr(gm, f"{base}.sa_signs", result.signs, buffer=True, before=site.node)
            bias = site.node.args[2] if len(site.node.args) > 2 else site.node.kwargs.get("bias")
            replace_with_call(gm, site.node, op, (site.input, packed, exps, signs, bias, self._group(site)))

    def _allocate(self, gm: GraphModule, sites: list[LinearSite], hessians: dict, ctx: PassContext):
        """Score each site at every budget choice, allocate greedily, then quantize at the chosen bits.

        Sensitivity is the error the fast weight-only BCQ leaves, weighted by H when there is
        calibration data: cheap, and the same allocation for both methods at one budget. Only
        `bcq_calibrated` then re-quantizes each layer once at its allotted bits.
        """
        scored: dict[str, dict[int, tuple[BcqWeight, float]]] = {}
        for site in ctx.progress(sites, desc="shift_add sensitivity"):
            hessian = hessians.get(site.node.name)
            weight = get_attr(gm, site.weight_name)
            scored[site.node.name] = {}
            for bits in BUDGET_CHOICES:
                result = quantize_bcq(weight, bits, self._group(site), self.apot_terms, self.iters)
                scored[site.node.name][bits] = (result, output_error(weight, result.dequantize(), hessian))
        sizes = {s.node.name: s.in_features * s.out_features for s in sites}
        allocation = allocate_bits({n: {b: e for b, (_, e) in o.items()} for n, o in scored.items()},
                                   sizes, self.bit_budget)
        chosen = {}
        for site in sites:
            bits = allocation[site.node.name]
            chosen[site.node.name] = (scored[site.node.name][bits][0] if self.method == "bcq"
                                      else self._quantize(site, gm, bits, hessians.get(site.node.name)))
        return chosen, {s.module_path: allocation[s.node.name] for s in sites}


def allocate_bits(errors: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Planes per layer with Σ bits·size ≤ budget·Σ size, minimizing the summed error greedily.

    Every layer starts at the fewest planes; the upgrade (to the next choice) with the largest
    error reduction per added stored bit is taken while it fits the budget.

    >>> allocate_bits({"a": {2: 9.0, 3: 1.0, 4: 0.5}, "b": {2: 2.0, 3: 1.5, 4: 1.4}}, {"a": 1, "b": 1}, 2.5)
    {'a': 3, 'b': 2}
    """
    choices = sorted(next(iter(errors.values()))) if errors else list(BUDGET_CHOICES)
    current = {name: choices[0] for name in errors}
    spent = sum(sizes[n] * choices[0] for n in errors)
    allowed = budget * sum(sizes[n] for n in errors) + 1e-9
    while True:
        best, best_gain = None, -1.0
        for name, bits in current.items():
            if bits == choices[-1]:
                continue
            nxt = choices[choices.index(bits) + 1]
            cost = (nxt - bits) * sizes[name]
            if spent + cost > allowed:
                continue
            gain = (errors[name][bits] - errors[name][nxt]) / cost
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return current
        nxt = choices[choices.index(current[best]) + 1]
        spent += (nxt - current[best]) * sizes[best]
        current[best] = nxt
