"""Wanda-sp: Wanda's |W|·‖X‖ importance aggregated over a structure (per head / channel).

For each linear member of a group: reading the channels (columns j), Σ_i |W_ij|·‖X_j‖₂; writing
them (rows i), Σ_j |W_ij|·‖X_j‖₂ with X that linear's input. A unit's score is the sum over its
indices. Uniform allocation (the FLAP paper's Wanda-sp baseline prunes every layer alike).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxforge.ir.depgraph import Group
from fxforge.ir.graph import get_attr

NEEDS_CALIBRATION = True
ALLOCATION = "uniform"


def score_group(gm: GraphModule, group: Group, stats: dict) -> torch.Tensor | str:
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
