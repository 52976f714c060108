"""Wanda-sp: Wanda's |W|·‖X‖ importance aggregated over a structure (per head / channel).

For each linear member of a group: reading the channels (columns j), Σ_i |W_ij|·‖X_j‖₂; writing
them (rows i), Σ_j |W_ij|·‖X_j‖₂ with X that linear's input. A unit's score is the sum over its
indices. Uniform allocation (the FLAP paper's Wanda-sp baseline prunes every layer alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.ir.graph import get_attr
from fxforge.passes.methods import register_method
from fxforge.passes.prune.scoring import PruneMethod, check_calibration_batches


@register_method("prune")
@dataclass(frozen=True)
class WandaSp(PruneMethod):
    """calibration_batches: calibration items read for ‖X_j‖₂."""

    name = "wanda_sp"
    needs_calibration = True
    statistics = ("moments",)
    allocation = "uniform"
    calibration_batches: int = 16

    def __post_init__(self) -> None:
        check_calibration_batches("prune(method=wanda_sp)", self.calibration_batches)

    def score_group(self, gm: GraphModule, group: Group, stats: dict[str, Any]) -> torch.Tensor | str:
        total = torch.zeros(group.units, dtype=torch.float64)
        used = 0
        for m in group.members:
            st = stats.get(m.name)
            if st is None:
                continue  # not a linear weight (norm weights, biases): no activation to weigh by
            w = get_attr(gm, m.name).detach().double().abs()
            norm = st.norm.double()
            per_index = (w * norm).sum(0) if m.dim == 1 else (w * norm).sum(1)
            total += per_index[m.indices].sum(1)
            used += 1
        if not used:
            return "no linear layer reads or writes these channels (Wanda-sp needs one)"
        return total.float()
