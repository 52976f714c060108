"""What the structured-pruning methods share: per-unit aggregation and choosing units to remove.

A method turns a group into one score per unit (higher = more important). `select_units` then
picks the units to remove so that `ratio` of the candidate parameters go:

* "uniform": every group loses about the same fraction of its units (magnitude, Wanda-sp:
  their raw scores are not comparable across layers). Units are ranked within their group and
  removed by rank percentile across groups, so the parameter target is met even when a group
  has too few units (2 key/value heads) to lose exactly `ratio` of them;
* "global": all units of all groups are sorted together and removed lowest first, each costing
  its parameter count (FLAP's adaptive structure: scores are standardized per layer, so a head
  and an MLP channel compete on the same scale and layers end up with different widths).

Both keep at least one unit per group and round each group's kept width up to a multiple of
`round_to` (kernels like widths that are multiples of 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.passes.methods import Method


@dataclass(frozen=True)
class PruneMethod(Method):
    """A `prune(method=...)` method: scores the units of a group; fields are its own options.

    allocation: how "auto" allocation spreads the ratio ("global": standardized scores compete
        across groups; "uniform": every group loses about the same fraction).
    statistics: what the calibration engine observes at the input of every linear member when
        `needs_calibration` is set (`fxforge.calibration.observers`); `score_group` and
        `compensation` read them as `stats[weight name]` (an `InputStatistics`).
    """

    allocation: ClassVar[str] = "uniform"

    def score_group(self, gm: GraphModule, group: Group, stats: dict[str, Any]) -> torch.Tensor | str:
        """(units,) scores, higher = keep; or the reason the group cannot be scored."""
        raise NotImplementedError

    def compensation(self, gm: GraphModule, group: Group, removed: list[int],
                     stats: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weight name -> bias delta making up for the removed units (none by default)."""
        return {}


def check_calibration_batches(method: str, value: int) -> None:
    """ValueError unless `value` (how many calibration items a method reads) is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{method}: calibration_batches must be a positive integer, got {value!r}")


@dataclass
class Candidate:
    """A group the pass may shrink, with its unit scores."""

    group: Group
    scores: torch.Tensor  # (units,) float, higher = keep
    multiple: int = 1  # kept units must be a multiple of this (round_to in units)

    @property
    def cost(self) -> int:
        return self.group.params_per_unit


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over all entries; a constant vector becomes zeros."""
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return ((x - x.mean()) / std if std > 0 else x - x.mean()).float()


def unit_multiple(group: Group, round_to: int) -> int:
    """How many units make a kept width divisible by `round_to` in the group's widest member."""
    if round_to <= 1:
        return 1
    width = max(m.per_unit for m in group.members)
    return round_to // math.gcd(round_to, width)


def _round_kept(units: int, kept: int, multiple: int) -> int:
    kept = max(kept, 1)
    kept = -(-kept // multiple) * multiple  # round up: never remove more than asked
    return min(kept, units)


def select_units(candidates: list[Candidate], ratio: float, allocation: str) -> dict[int, list[int]]:
    """Group id -> units to remove (lowest scores first), removing about `ratio` of the parameters."""
    if ratio <= 0 or not candidates:
        return {}
    if allocation == "uniform":
        ranked = [Candidate(c.group, _percentiles(c.scores), c.multiple) for c in candidates]
        kept = _global_kept(ranked, ratio)
    elif allocation == "global":
        kept = _global_kept(candidates, ratio)
    else:
        raise ValueError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    removed = {}
    for c in candidates:
        n_remove = c.group.units - kept[c.group.id]
        if n_remove > 0:
            order = torch.argsort(c.scores, stable=True)
            removed[c.group.id] = sorted(order[:n_remove].tolist())
    return removed


def _percentiles(scores: torch.Tensor) -> torch.Tensor:
    """Each unit's rank within its group as a fraction in [0, 1): comparable across groups."""
    ranks = torch.empty(len(scores))
    ranks[torch.argsort(scores, stable=True)] = torch.arange(len(scores), dtype=torch.float32)
    return ranks / len(scores)


def _global_kept(candidates: list[Candidate], ratio: float) -> dict[int, int]:
    total = sum(c.group.units * c.cost for c in candidates)
    target = ratio * total
    entries = sorted((float(s), i, u) for i, c in enumerate(candidates) for u, s in enumerate(c.scores))
    removed_count = [0] * len(candidates)
    removed = 0.0
    for _, i, _ in entries:
        if removed >= target:
            break
        c = candidates[i]
        if c.group.units - removed_count[i] - 1 < max(c.multiple, 1):
            continue  # never empty a group
        removed_count[i] += 1
        removed += c.cost
    return {c.group.id: _round_kept(c.group.units, c.group.units - removed_count[i], c.multiple)
            for i, c in enumerate(candidates)}
