"""FLAP (arXiv 2312.11983): fluctuation-based scores, global adaptive structure, bias compensation.

For each input channel j of the linear that reads a group's channels (an attention output
projection, an MLP down projection): fluctuation F_j = mean over tokens of (x_j - x̄_j)² and
WIFV_j = F_j·‖W[:, j]‖². Attention channels (heads, query heads, head dims): the score is
squared, standardized over the layer's channels and averaged over each unit's channels; MLP
channels: standardized over the layer. Standardized scores compete globally ("global"
allocation). Removed channels are compensated: b += W[:, removed]·x̄[removed].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.ir.graph import get_attr
from fxforge.passes.methods import register_method
from fxforge.passes.prune.scoring import PruneMethod, check_calibration_batches, standardize

ATTENTION_KINDS = ("heads", "query_heads", "head_dim")


@register_method("prune")
@dataclass(frozen=True)
class Flap(PruneMethod):
    """bias_compensation: b += W[:, pruned]·x̄[pruned]; calibration_batches: items read."""

    name = "flap"
    needs_calibration = True
    statistics = ("moments",)
    allocation = "global"
    bias_compensation: bool = True
    calibration_batches: int = 16

    def __post_init__(self) -> None:
        check_calibration_batches("prune(method=flap)", self.calibration_batches)

    def score_group(self, gm: GraphModule, group: Group, stats: dict[str, Any]) -> torch.Tensor | str:
        total = torch.zeros(group.units)
        used = 0
        for m in group.members:
            st = stats.get(m.name)
            if st is None or m.dim != 1:
                continue  # FLAP scores the channels where a linear reads them
            w = get_attr(gm, m.name).detach().float()
            wifv = st.fluctuation * w.pow(2).sum(0)
            if group.kind in ATTENTION_KINDS:
                wifv = wifv.pow(2)
            total += standardize(wifv)[m.indices].mean(1)
            used += 1
        if not used:
            return "no linear layer reads these channels (FLAP scores a layer's input channels)"
        return total / used

    def compensation(self, gm: GraphModule, group: Group, removed: list[int],
                     stats: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weight name -> bias delta W[:, removed]·x̄[removed] for each linear reading the channels."""
        if not self.bias_compensation:
            return {}
        deltas = {}
        for m in group.members:
            st = stats.get(m.name)
            if st is None or m.dim != 1 or not removed:
                continue
            cols = m.indices[removed].reshape(-1)
            w = get_attr(gm, m.name).detach().float()
            deltas[m.name] = w[:, cols] @ st.mean[cols]
        return deltas
