"""What `prune` claims to compute: the graph before with the removed structures zeroed.

Removing a unit of a coupling group (an attention head, an MLP hidden unit) computes exactly
what the unpruned graph computes with every parameter slice along that unit set to zero: the
producer rows and biases give 0 there and, decisively, the consumer's input columns are zero,
so nothing of the unit reaches the rest of the graph. FLAP's bias compensation adds
W[:, removed]·x̄[removed] to the consumer's bias. So the reference keeps every shape of the
graph before and only zeroes slices (and adds the compensation), independently of the surgery
that slices tensors and rewrites view/split sizes: a surgery bug (a wrong index, a size left
behind, a head split at the wrong place) shows up as a mismatch.

This equivalence holds for groups that only feed parameters ("heads", "query_heads",
"channels"). Zeroing a slice of the residual stream ("hidden") is not removing it (norms average
over the width), nor is zeroing a rotary pair's half ("head_dim"): for those the claim is marked
unverified, and only the loss is measured.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule

from fxforge.ir.depgraph import CouplingAnalysis
from fxforge.ir.graph import get_attr
from fxforge.ir.reference import Semantics

EXACT_BY_ZEROING = ("heads", "query_heads", "channels")


class CompensatedLinear:
    """fn(x, bias) = linear(x, W with removed slices zeroed, bias + FLAP's compensation)."""

    def __init__(self, weight: Tensor, delta: Tensor):
        self.weight, self.delta = weight, delta

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        total = self.delta if bias is None else bias.to(self.delta.dtype) + self.delta
        return F.linear(x, self.weight.to(x.dtype), total.to(x.dtype))


def zeroed_semantics(gm: GraphModule, analysis: CouplingAnalysis, pruned: dict[int, set[int]],
                     deltas: dict[str, Tensor], kinds: set[str]) -> Semantics:
    """The claim of pruning `pruned` units of `gm` (called before the surgery, on unsliced tensors)."""
    semantics = Semantics()
    pruned = {leaf: set(units) for leaf, units in pruned.items() if units}
    for name, dims in analysis.params.items():
        tensor = get_attr(gm, name).detach()
        zeroed = tensor
        for d, axis in enumerate(dims):
            if not analysis.touched(axis, pruned):
                continue
            keep = set(analysis.keep_indices(axis, pruned))
            removed = torch.tensor([i for i in range(tensor.shape[d]) if i not in keep], dtype=torch.long)
            zeroed = zeroed.index_fill(d, removed, 0)
        if zeroed is not tensor:
            semantics.replace_weight(name, zeroed)
    for name, delta in deltas.items():
        weight = semantics.weights.get(name, get_attr(gm, name).detach())
        semantics.replace_linear(name, CompensatedLinear(weight, delta.to(torch.float32)))
    unexact = sorted(kinds - set(EXACT_BY_ZEROING))
    if unexact:
        semantics.unverified = (f"removing {'/'.join(unexact)} units is not the same as zeroing them (norms and "
                                f"rotary embeddings see the width), so only the loss is measured")
    return semantics


__all__ = ["zeroed_semantics", "EXACT_BY_ZEROING"]
