"""Pass `sparsify`: zero weights of linear layers, unstructured or in an N:M pattern.

    sparsify(method='wanda', sparsity=0.5)            half the weights of every row
    sparsify(method='magnitude', pattern='2:4')       2 of every 4 consecutive inputs
    sparsify(method='dsnot', sparsity=0.6)            Wanda's mask, refined without training

Scores: magnitude |W_ij| (unstructured: lowest of the whole layer); Wanda |W_ij|·‖X_j‖₂ (lowest
of each output row); N:M keeps the N highest scores of every M consecutive inputs of a row.
DSnoT (arXiv 2310.08915) starts from Wanda's mask and, per row, swaps one pruned weight back
in and one kept weight out while that shrinks the layer's reconstruction error (at most
`dsnot_cycles` swaps; swaps stay inside an M-block for N:M), so the sparsity and the pattern
are unchanged. The error is measured exactly, rᵀ·E[x xᵀ]·r for the pruned weights r of a row,
where the paper uses a mean/variance proxy (see `dsnot_refine` for why).

Calibrated methods run through the calibration engine block by block (`fxforge.calibration`):
a block's masks come from its inputs' statistics, then the sparse block produces the next
block's inputs, as Wanda's reference implementation prunes layer by layer; one block's
statistics are held at a time.

Weights are zeroed in place: the graph and its shapes are unchanged and no backend claims a
speedup. A layer `quantize` already turned into `fxforge::linear_wq` is sparsified through its
codes (`prune/quantized.py`): a pruned weight's code is set to its group's zero point, which
dequantizes to exactly 0, scored on the dequantized weight (its mask is not recorded below). The masks are recorded in `gm.meta["fxforge_sparsity_masks"]` (weight name -> bool mask, True
= kept) so later passes or fine-tuning can keep them (`reapply_masks(gm)`).

Semantics (verified exactly): the graph before with each weight times its recorded mask. The
loss is measured and reported, not bounded (`max_loss=` bounds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule

from fxforge.calibration.engine import BlockCalibration, calibrate
from fxforge.calibration.observers import InputStatistics
from fxforge.ir.graph import LinearSite, get_attr, set_attr
from fxforge.ir.reference import Semantics
from fxforge.ir.verify import LossBound
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.methods import methods_of, pass_method
from fxforge.passes.prune.masks import mask_n_m, mask_unstructured, parse_pattern
from fxforge.passes.prune.quantized import mask_codes, quantized_sites
from fxforge.passes.prune.sparsify_methods import SparsifyMethod
from fxforge.passes.selection import LayerSelection

MASKS_META = "fxforge_sparsity_masks"  # "fxforge_": saved with the artifact


def reapply_masks(gm: GraphModule) -> int:
    """Zero every weight where its recorded mask says so (e.g. after fine-tuning); returns count."""
    masks = gm.meta.get(MASKS_META, {})
    for name, mask in masks.items():
        weight = get_attr(gm, name)
        with torch.no_grad():
            weight.mul_(mask.to(weight.dtype))
    return len(masks)


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    """Zero weights of linear layers: unstructured `sparsity` or an N:M `pattern`.

    method: "magnitude" | "wanda" | "dsnot" (Wanda + DSnoT refinement); classes in
        sparsify_methods.py, and an option of another method is an error.
    sparsity: fraction of weights zeroed, in [0, 1) (unstructured only; N:M fixes it to 1-N/M).
    pattern: "unstructured" or "N:M" (e.g. "2:4").
    targets / exclude / include_lm_head: which linear layers (module-path patterns).
    calibration_batches: calibration items read (wanda's and dsnot's option).
    dsnot_cycles: swaps per row (dsnot's option).
    max_rel_error: deprecated spelling of max_loss={"rel_l2": ...}; None (default): no bound.
    """

    name = "sparsify"
    consumes = frozenset({"linear", "linear_wq"})  # passes/compatibility.py
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    include_lm_head: bool = False
    calibration_batches: int = 16
    dsnot_cycles: int = 50
    max_rel_error: float | None = None

    def __post_init__(self) -> None:
        if self.method not in methods_of("sparsify"):
            raise ValueError(f"sparsify: method must be one of {tuple(methods_of('sparsify'))}, got {self.method!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsify: sparsity is the fraction of weights to zero and must be in "
                             f"[0, 1), got {self.sparsity!r}")
        parse_pattern(self.pattern)
        LayerSelection.normalize_fields(self)
        self.method_object()  # options of another method fail here, at construction

    def method_object(self) -> SparsifyMethod:
        """The method object, built from the options that are its own."""
        return pass_method("sparsify", self)  # type: ignore[return-value]

    def loss_bound(self) -> LossBound | None:
        if self.max_rel_error is not None and self.max_loss is None:
            return LossBound(rel_l2=self.max_rel_error)
        return super().loss_bound()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        n_m = parse_pattern(self.pattern)
        method = self.method_object()
        selection = LayerSelection.of(self).sites(gm, self.name)
        quantized = quantized_sites(gm, LayerSelection.of(self), self.include_lm_head)
        sites = selection.sites + quantized
        done_paths = {s.module_path for s in quantized}
        skipped = [(where, why) for where, why in selection.skipped if where not in done_paths]
        if n_m is not None:
            fits = [s for s in sites if s.in_features % n_m[1] == 0]
            skipped += [(s.module_path, f"{s.in_features} inputs are not a multiple of M={n_m[1]}")
                        for s in sites if s not in fits]
            sites = fits
        masks = dict(gm.meta.get(MASKS_META, {}))
        semantics = Semantics()
        counts = [0, 0]  # zeroed, total

        def sparsify_site(site: LinearSite, stats: InputStatistics | None) -> None:
            if site.node.target != torch.ops.aten.linear.default:  # codes of a quantized layer
                counts[0] += mask_codes(gm, site, lambda w: _mask(method, w, stats, n_m, self.sparsity), semantics)
                counts[1] += site.out_features * site.in_features
                return
            weight = get_attr(gm, site.weight_name)
            mask = _mask(method, weight.detach().float(), stats, n_m, self.sparsity)
            semantics.replace_weight(site.weight_name, weight.detach().masked_fill(~mask, 0))
            set_attr(gm, site.weight_name, weight.detach() * mask.to(weight.dtype))
            masks[site.weight_name] = mask
            counts[0] += int((~mask).sum())
            counts[1] += mask.numel()

        if method.needs_calibration:
            self._calibrate_and_sparsify(gm, sites, ctx, method, sparsify_site)
        else:
            for site in sites:
                sparsify_site(site, None)
        gm.meta[MASKS_META] = masks
        notes = {"method": self.method, "pattern": self.pattern,
                 "sparsity": counts[0] / counts[1] if counts[1] else 0.0, "layers": len(sites)}
        return PassResult(gm, sites=len(sites), skipped=skipped, notes=notes, semantics=semantics)

    def _calibrate_and_sparsify(self, gm: GraphModule, sites: list[LinearSite], ctx: PassContext,
                                method: SparsifyMethod,
                                sparsify_site: Callable[[LinearSite, InputStatistics], None]) -> None:
        """Block by block through the calibration engine: a block's layers get their masks from
        its inputs' statistics, then the sparse block runs to feed the next one, so later
        blocks are calibrated on what the earlier sparse ones compute (Wanda's sequential form)
        and only one block's statistics (DSnoT: its E[x xᵀ]) are held at a time."""
        ctx.require_calibration(self.name, method=self.method)
        by_node = {site.node: site for site in sites}

        def rewrite_block(block: BlockCalibration) -> None:
            for node in block.nodes:
                sparsify_site(by_node[node], block.stats(node))

        calibrate(gm, ctx, {site.node: method.statistics for site in sites}, rewrite_block,
                  pass_name=self.name, method=self.method, max_batches=method.calibration_batches)


def _mask(method: SparsifyMethod, weight: torch.Tensor, stats: InputStatistics | None,
          n_m: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
    """The keep-mask of one weight: the method's scores, the pattern, the method's refinement."""
    scores = method.scores(weight, stats)
    if n_m is not None:
        mask = mask_n_m(scores, *n_m)
    else:
        mask = mask_unstructured(scores, sparsity, per_row=method.per_row)
    return method.refine(weight, mask, stats, block=n_m[1] if n_m else None)
