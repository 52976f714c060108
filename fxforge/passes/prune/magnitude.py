"""Structured magnitude pruning: a unit's score is the L2 norm of all its parameters.

No calibration data. Scores of different groups are not comparable, so the pass removes the
same fraction of every group ("uniform" allocation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.ir.graph import get_attr
from fxforge.passes.methods import register_method
from fxforge.passes.prune.scoring import PruneMethod


@register_method("prune")
@dataclass(frozen=True)
class Magnitude(PruneMethod):
    """No options: the weights alone decide."""

    name = "magnitude"
    allocation = "uniform"

    def score_group(self, gm: GraphModule, group: Group, stats: dict[str, Any]) -> torch.Tensor | str:
        """‖unit's slices of every member‖₂ per unit."""
        total = torch.zeros(group.units, dtype=torch.float64)
        for m in group.members:
            w = get_attr(gm, m.name).detach().double()
            sq = w.pow(2).transpose(0, m.dim).reshape(w.shape[m.dim], -1).sum(1)  # per index of dim
            total += sq[m.indices].sum(1)
        return total.sqrt().float()
