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
FLAP's compensation added to the biases (`prune/semantics.py`). The loss is measured and
reported, not bounded (`max_loss=` bounds it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.depgraph import Group, analyze
from fxforge.ir.graph import add_attr, get_attr, matches_any, set_attr
from fxforge.ir.verify import LossBound
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.prune import flap, magnitude, wanda_sp
from fxforge.passes.prune.capture import capture_input_stats
from fxforge.passes.prune.scoring import Candidate, select_units, unit_multiple
from fxforge.passes.prune.semantics import zeroed_semantics
from fxforge.passes.prune.surgery import apply_pruning, linear_nodes_by_weight
from fxforge.passes.selection import require_matches

METHODS: dict[str, ModuleType] = {"flap": flap, "magnitude": magnitude, "wanda_sp": wanda_sp}
STRUCTURES = ("heads", "query_heads", "head_dim", "channels", "hidden")


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Remove whole heads and channels; the pruned graph is smaller in every backend.

    method: "flap" | "magnitude" | "wanda_sp".
    ratio: fraction of the candidate groups' parameters to remove, in [0, 1).
    targets / exclude: module-path patterns (fnmatch, suffix semantics) a group must match /
        must not match; a group's path is its members' common module ("model.layers.0.mlp").
    structures: group kinds to prune (see `Group.kind`).
    round_to: keep each pruned width a multiple of this (1 = no rounding).
    allocation: "auto" (the method's own: FLAP global, others uniform), "global" or "uniform".
    bias_compensation: FLAP's b += W[:, pruned]·x̄[pruned] (flap only).
    calibration_batches: how many calibration items to read (flap, wanda_sp).
    max_rel_error: deprecated spelling of max_loss={"rel_l2": ...}; None (default): no bound.
    """

    name = "prune"
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
        if self.method not in METHODS:
            raise ValueError(f"prune: method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"prune: ratio is the fraction of parameters to remove and must be in "
                             f"[0, 1), got {self.ratio!r}")
        for field_name in ("targets", "exclude", "structures"):
            value = getattr(self, field_name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, field_name, (value,) if isinstance(value, str) else tuple(value))
        unknown = set(self.structures) - set(STRUCTURES)
        if unknown or not self.structures:
            raise ValueError(f"prune: structures must be a non-empty subset of {STRUCTURES}, got "
                             f"{self.structures!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"prune: round_to must be a positive integer, got {self.round_to!r}")
        if self.allocation not in ("auto", "global", "uniform"):
            raise ValueError(f"prune: allocation must be 'auto', 'global' or 'uniform', got "
                             f"{self.allocation!r}")

    def loss_bound(self) -> LossBound | None:
        if self.max_rel_error is not None and self.max_loss is None:
            return LossBound(rel_l2=self.max_rel_error)
        return super().loss_bound()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        method = METHODS[self.method]
        analysis = analyze(gm)
        groups, skipped = self._candidate_groups(analysis.groups)
        if self.ratio == 0 or not groups:
            return PassResult(gm, sites=0, skipped=skipped, notes={"method": self.method})
        stats = self._calibrate(gm, groups, ctx) if method.NEEDS_CALIBRATION else {}
        candidates = []
        for g in groups:
            scores = method.score_group(gm, g, stats)
            if isinstance(scores, str):
                skipped.append((_label(g), scores))
                continue
            candidates.append(Candidate(g, scores, unit_multiple(g, self.round_to)))
        allocation = method.ALLOCATION if self.allocation == "auto" else self.allocation
        removed = select_units(candidates, self.ratio, allocation)
        by_id = {g.id: g for g in groups}
        deltas: dict[str, torch.Tensor] = {}
        if self.method == "flap" and self.bias_compensation:
            for gid, units in removed.items():
                for name, delta in flap.compensation(gm, by_id[gid], units, stats).items():
                    deltas[name] = deltas.get(name, 0) + delta
        params_before = sum(t.numel() for t in gm.parameters())
        pruned = {by_id[gid].leaf: set(units) for gid, units in removed.items()}
        semantics = zeroed_semantics(gm, analysis, pruned, deltas,
                                     {by_id[gid].kind for gid, units in removed.items() if units})
        changes = apply_pruning(gm, analysis, pruned)
        _add_biases(gm, analysis, pruned, deltas)
        params_after = sum(t.numel() for t in gm.parameters())
        widths = {_label(by_id[gid]): f"{by_id[gid].units} -> {by_id[gid].units - len(units)}"
                  for gid, units in removed.items()}
        notes = {"method": self.method, "allocation": allocation,
                 "parameters_before": params_before, "parameters_after": params_after,
                 "removed_fraction_of_model": 1 - params_after / max(params_before, 1),
                 "widths": widths, "size_rewrites": changes["size_rewrites"],
                 "compensated": sorted(deltas)}
        return PassResult(gm, sites=len(removed), skipped=skipped, notes=notes, semantics=semantics)

    def _candidate_groups(self, all_groups: list[Group]) -> tuple[list[Group], list[tuple[str, str]]]:
        skipped = []
        chosen = []
        matched_any_target = set()
        for g in all_groups:
            if g.kind not in self.structures:
                continue
            path = group_path(g)
            if self.targets is not None:
                hits = [p for p in self.targets if matches_any(path, [p])]
                if not hits:
                    continue
                matched_any_target.update(hits)
            if self.exclude and matches_any(path, self.exclude):
                continue
            if not g.prunable:
                skipped.append((_label(g), g.blocked))
                continue
            chosen.append(g)
        if self.targets is not None:
            missing = [t for t in self.targets if t not in matched_any_target]
            if missing:
                known = sorted({group_path(g) for g in all_groups if g.kind in self.structures})
                raise PassError(
                    f"prune: target(s) {missing} match no {'/'.join(self.structures)} group. "
                    f"Groups of those kinds live at: {', '.join(known) or 'nowhere'}. "
                    f"Use fxforge.ir.depgraph.groups(gm) to list every group.", pass_name="prune")
        if self.exclude:  # a typo in exclude would prune a structure the user meant to keep
            known = sorted({group_path(g) for g in all_groups if g.kind in self.structures})
            require_matches(self.name, "exclude", self.exclude, known, what=f"{'/'.join(self.structures)} group")
        return chosen, skipped

    def _calibrate(self, gm: GraphModule, groups: list[Group], ctx: PassContext) -> dict:
        ctx.require_calibration(self.name, method=self.method)
        by_weight = linear_nodes_by_weight(gm)
        names = {m.name for g in groups for m in g.members if m.name in by_weight}
        nodes = [by_weight[n][0] for n in sorted(names)]
        batches = ctx.calibration_batches(gm, self.calibration_batches, pass_name=self.name, method=self.method)
        stats = capture_input_stats(gm, nodes, batches,
                                    progress=ctx.progress)
        return {n: stats[by_weight[n][0].name] for n in names if by_weight[n][0].name in stats}


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
    for name, delta in deltas.items():
        out_axis = analysis.params[name][0]
        if analysis.touched(out_axis, pruned):  # the output dim was pruned too
            delta = delta[torch.tensor(analysis.keep_indices(out_axis, pruned))]
        for node in by_weight[name]:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if bias is not None:
                set_attr(gm, bias.target, get_attr(gm, bias.target) + delta.to(get_attr(gm, bias.target).dtype))
                continue
            weight = get_attr(gm, name)
            new = add_attr(gm, name.rsplit(".", 1)[0] + ".bias", delta.to(weight.dtype),
                           trainable=weight.requires_grad, before=node)
            node.args = (node.args[0], node.args[1], new)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
