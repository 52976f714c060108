"""Structured magnitude pruning: a unit's score is the L2 norm of all its parameters.

No calibration data. Scores of different groups are not comparable, so the pass removes the
same fraction of every group ("uniform" allocation).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.ir.graph import get_attr

NEEDS_CALIBRATION = False
ALLOCATION = "uniform"


def score_group(gm: GraphModule, group: Group, stats: dict) -> torch.Tensor | str:
    """‖unit's slices of every member‖₂ per unit."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        w = get_attr(gm, m.name).detach().double()
        sq = w.pow(2).transpose(0, m.dim).reshape(w.shape[m.dim], -1).sum(1)  # per index of dim
        total += sq[m.indices].sum(1)
    return total.sqrt().float()
