"""Pass `prune`: structured pruning of heads and channels found by the dependency analysis.

    prune(method='flap', ratio=0.2)                       FLAP, 20% of attention+MLP parameters
    prune(method='magnitude', ratio=0.3, round_to=8)      L2 norm per unit, widths multiple of 8
    prune(method='wanda_sp', ratio=0.2, targets=['layers.1.*'])

Flow: `ir.depgraph.analyze` finds the coupling groups; the candidates are the prunable groups
whose kind is in `structures` ("heads" = whole attention heads, with GQA whole key/value groups;
"query_heads" = query heads inside each group; "channels" = MLP hidden units / conv filters) and
whose module path matches `targets`; the method scores their units; `scoring.select_units`
picks what goes; FLAP adds compensation biases; `surgery.apply_pruning` slices the weights and
rewrites reshape/split sizes so the graph runs at the new widths. Groups the analysis could not
prove (or that reach the model's inputs/outputs) are skipped and listed in the report.

Semantics (verified exactly): the graph before with the removed heads/channels zeroed and
FLAP's compensation added to the biases (`prune/semantics.py`). To keep that exact, a mean
over a pruned head/channel dim (a norm over all heads: OLMoE's q_norm, BitNet's sub-norm) is
scaled by new/old width, so it still divides by the old width; a layer whose weights run in
several blocks (ALBERT) gets its compensation once. The loss is measured and
reported, not bounded (`max_loss=` bounds it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxforge.calibration.engine import calibrate
from fxforge.ir.depgraph import Group, analyze
from fxforge.ir.graph import add_attr, get_attr, set_attr
from fxforge.ir.verify import LossBound
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.methods import methods_of, pass_method
from fxforge.passes.prune import flap, magnitude, wanda_sp  # noqa: F401  (register the methods)
from fxforge.passes.prune.scoring import Candidate, PruneMethod, select_units, unit_multiple
from fxforge.passes.prune.semantics import EXACT_BY_ZEROING, zeroed_semantics
from fxforge.passes.prune.surgery import apply_pruning, linear_nodes_by_weight
from fxforge.passes.selection import LayerSelection

STRUCTURES = ("heads", "query_heads", "head_dim", "channels", "hidden")


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Remove whole heads and channels; the pruned graph is smaller in every backend.

    method: "flap" | "magnitude" | "wanda_sp" (classes in flap.py, magnitude.py, wanda_sp.py;
        an option of another method is an error).
    ratio: fraction of the candidate groups' parameters to remove, in [0, 1).
    targets / exclude: module-path patterns (fnmatch, suffix semantics) a group must match /
        must not match; a group's path is its members' common module ("model.layers.0.mlp").
    structures: group kinds to prune (see `Group.kind`).
    round_to: keep each pruned width a multiple of this (1 = no rounding).
    allocation: "auto" (the method's own: FLAP global, others uniform), "global" or "uniform".
    bias_compensation: FLAP's b += W[:, pruned]·x̄[pruned] (flap's option).
    calibration_batches: how many calibration items to read (flap's and wanda_sp's option).
    max_rel_error: deprecated spelling of max_loss={"rel_l2": ...}; None (default): no bound.
    """

    name = "prune"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    method: str = "flap"
    ratio: float = 0.2
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    structures: tuple[str, ...] = ("heads", "channels")
    round_to: int = 1
    allocation: str = "auto"
    bias_compensation: bool = True
    calibration_batches: int = 16
    max_rel_error: float | None = None

    def __post_init__(self) -> None:
        if self.method not in methods_of("prune"):
            raise ValueError(f"prune: method must be one of {sorted(methods_of('prune'))}, got {self.method!r}")
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"prune: ratio is the fraction of parameters to remove and must be in "
                             f"[0, 1), got {self.ratio!r}")
        LayerSelection.normalize_fields(self)
        if isinstance(self.structures, (str, list)):
            object.__setattr__(self, "structures",
                               (self.structures,) if isinstance(self.structures, str) else tuple(self.structures))
        unknown = set(self.structures) - set(STRUCTURES)
        if unknown or not self.structures:
            raise ValueError(f"prune: structures must be a non-empty subset of {STRUCTURES}, got "
                             f"{self.structures!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"prune: round_to must be a positive integer, got {self.round_to!r}")
        if self.allocation not in ("auto", "global", "uniform"):
            raise ValueError(f"prune: allocation must be 'auto', 'global' or 'uniform', got "
                             f"{self.allocation!r}")
        self.method_object()  # options of another method fail here, at construction

    def method_object(self) -> PruneMethod:
        """The method object, built from the options that are its own."""
        return pass_method("prune", self)  # type: ignore[return-value]

    def loss_bound(self) -> LossBound | None:
        if self.max_rel_error is not None and self.max_loss is None:
            return LossBound(rel_l2=self.max_rel_error)
        return super().loss_bound()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        method = self.method_object()
        analysis = analyze(gm)
        groups, skipped = self._candidate_groups(analysis.groups)
        if self.ratio == 0 or not groups:
            return PassResult(gm, sites=0, skipped=skipped, notes={"method": self.method})
        stats = self._calibrate(gm, groups, ctx, method) if method.needs_calibration else {}
        candidates = []
        for g in groups:
            scores = method.score_group(gm, g, stats)
            if isinstance(scores, str):
                skipped.append((_label(g), scores))
                continue
            candidates.append(Candidate(g, scores, unit_multiple(g, self.round_to)))
        allocation = method.allocation if self.allocation == "auto" else self.allocation
        removed = select_units(candidates, self.ratio, allocation)
        by_id = {g.id: g for g in groups}
        deltas: dict[str, torch.Tensor] = {}
        for gid, units in removed.items():
            for name, delta in method.compensation(gm, by_id[gid], units, stats).items():
                deltas[name] = deltas.get(name, 0) + delta
        params_before = sum(t.numel() for t in gm.parameters())
        pruned = {by_id[gid].leaf: set(units) for gid, units in removed.items()}
        semantics = zeroed_semantics(gm, analysis, pruned, deltas,
                                     {by_id[gid].kind for gid, units in removed.items() if units})
        exact = {by_id[gid].leaf for gid in removed if by_id[gid].kind in EXACT_BY_ZEROING}
        changes = apply_pruning(gm, analysis, pruned, rescale_leaves=exact)
        _add_biases(gm, analysis, pruned, deltas)
        params_after = sum(t.numel() for t in gm.parameters())
        widths = {_label(by_id[gid]): f"{by_id[gid].units} -> {by_id[gid].units - len(units)}"
                  for gid, units in removed.items()}
        notes = {"method": self.method, "allocation": allocation,
                 "parameters_before": params_before, "parameters_after": params_after,
                 "removed_fraction_of_model": 1 - params_after / max(params_before, 1),
                 "widths": widths, "size_rewrites": changes["size_rewrites"],
                 "rescaled_means": changes["rescaled_means"],
                 "compensated": sorted(deltas)}
        return PassResult(gm, sites=len(removed), skipped=skipped, notes=notes, semantics=semantics)

    def _candidate_groups(self, all_groups: list[Group]) -> tuple[list[Group], list[tuple[str, str]]]:
        kinds = [g for g in all_groups if g.kind in self.structures]
        selection = LayerSelection.of(self)
        # a typo in targets prunes nothing, one in exclude a structure the user meant to keep
        selection.require_matches(self.name, sorted({group_path(g) for g in kinds}),
                                  what=f"{'/'.join(self.structures)} group",
                                  hint=" fxforge.ir.depgraph.groups(gm) lists every group.")
        skipped = []
        chosen = []
        for g in kinds:
            if not selection.chooses(group_path(g)):
                continue
            if not g.prunable:
                skipped.append((_label(g), g.blocked))
                continue
            chosen.append(g)
        return chosen, skipped

    def _calibrate(self, gm: GraphModule, groups: list[Group], ctx: PassContext, method: PruneMethod) -> dict:
        """Weight name -> the statistics of its linear's input (`method.statistics`), every layer
        in one sweep of the calibration engine: scores compete across layers ("global"
        allocation), so all are needed before anything is removed."""
        ctx.require_calibration(self.name, method=self.method)
        by_weight = linear_nodes_by_weight(gm)
        names = sorted({m.name for g in groups for m in g.members if m.name in by_weight})
        result = calibrate(gm, ctx, {by_weight[n][0]: method.statistics for n in names}, pass_name=self.name,
                           method=self.method, max_batches=method.calibration_batches)
        return {n: result.statistics[by_weight[n][0].name] for n in names}


def group_path(group: Group) -> str:
    """The common module path of a group's members ("model.layers.0.self_attn")."""
    paths = [m.name.rsplit(".", 1)[0].split(".") for m in group.members]
    common = os.path.commonprefix(paths)
    return ".".join(common)


def _label(group: Group) -> str:
    return f"{group_path(group) or '<model>'} ({group.kind}, {group.units} units)"


def _add_biases(gm: GraphModule, analysis, pruned: dict, deltas: dict[str, torch.Tensor]) -> None:
    """b += delta for each compensated linear, creating the bias where the layer had none."""
    if not deltas:
        return
    by_weight = linear_nodes_by_weight(gm)
    updated: set[str] = set()  # a layer reused across the model (ALBERT) shares its bias: add once
    for name, delta in deltas.items():
        out_axis = analysis.params[name][0]
        if analysis.touched(out_axis, pruned):  # the output dim was pruned too
            delta = delta[torch.tensor(analysis.keep_indices(out_axis, pruned))]
        created = None
        for node in by_weight[name]:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None:
                if bias.target not in updated:
                    updated.add(bias.target)
                    set_attr(gm, bias.target, get_attr(gm, bias.target) + delta.to(get_attr(gm, bias.target).dtype))
                continue
            if created is None:
                weight = get_attr(gm, name)
                created = add_attr(gm, name.rsplit(".", 1)[0] + ".bias", delta.to(weight.dtype),
                                   trainable=weight.requires_grad, before=node)
            node.args = (node.args[0], node.args[1], created)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
