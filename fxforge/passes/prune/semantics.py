"""What `prune` claims to compute: the graph before with the removed structures zeroed.

Removing a unit of a coupling group (an attention head, an MLP hidden unit) computes exactly
what the unpruned graph computes with every parameter slice along that unit set to zero: the
producer rows and biases give 0 there and, decisively, the consumer's input columns are zero,
so nothing of the unit reaches the rest of the graph. FLAP's bias compensation adds
W[:, removed]·x̄[removed] to the consumer's bias. So the reference keeps every shape of the
graph before and only zeroes slices (and adds the compensation), independently of the surgery
that slices tensors and rewrites view/split sizes: a surgery bug (a wrong index, a size left
behind, a head split at the wrong place) shows up as a mismatch.

The reference holds no zeroed copy of a linear's weight (that was one more copy of every
pruned weight, ~1 GiB for an 8-layer TinyLlama, alive through verification): a weight read only
as `aten.linear`'s weight is claimed lazily, `MaskedLinear`: the removed input columns are zeroed
in the activation (x' W^T = x W'^T term by term) and the removed output rows in the result.
Other tensors (biases, norms, convs) are zeroed copies, as before.

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


class MaskedLinear:
    """fn(x, bias) = linear(x, W with rows `rows` and columns `cols` zeroed, bias (+ delta)),
    computed without a zeroed copy of W: columns are zeroed in x, rows in the product."""

    def __init__(self, weight: Tensor, rows: Optional[Tensor], cols: Optional[Tensor],
                 delta: Optional[Tensor] = None):
        self.weight, self.rows, self.cols, self.delta = weight, rows, cols, delta

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.cols is not None:
            x = x.index_fill(-1, self.cols, 0)
        y = F.linear(x, self.weight.to(x.dtype))
        if self.rows is not None:
            y = y.index_fill(-1, self.rows, 0)
        if self.delta is not None:
            bias = self.delta if bias is None else bias.to(self.delta.dtype) + self.delta
        return y if bias is None else y + bias.to(y.dtype)


def zeroed_semantics(gm: GraphModule, analysis: CouplingAnalysis, pruned: dict[int, set[int]],
                     deltas: dict[str, Tensor], kinds: set[str]) -> Semantics:
    """The claim of pruning `pruned` units of `gm` (called before the surgery, on unsliced tensors)."""
    semantics = Semantics()
    pruned = {leaf: set(units) for leaf, units in pruned.items() if units}
    linear_only = _read_only_as_linear_weight(gm)
    for name, dims in analysis.params.items():
        tensor = get_attr(gm, name).detach()
        removed: dict[int, Tensor] = {}
        for d, axis in enumerate(dims):
            if not analysis.touched(axis, pruned):
                continue
            keep = set(analysis.keep_indices(axis, pruned))
            removed[d] = torch.tensor([i for i in range(tensor.shape[d]) if i not in keep], dtype=torch.long)
        if not removed and name not in deltas:
            continue
        delta = deltas.get(name)
        delta = None if delta is None else delta.to(torch.float32)
        if name in linear_only and tensor.dim() == 2:
            semantics.replace_linear(name, MaskedLinear(tensor, removed.get(0), removed.get(1), delta))
            continue
        zeroed = tensor
        for d, index in removed.items():
            zeroed = zeroed.index_fill(d, index, 0)
        if zeroed is not tensor:
            semantics.replace_weight(name, zeroed)
        if delta is not None:
            semantics.replace_linear(name, CompensatedLinear(zeroed, delta))
    unexact = sorted(kinds - set(EXACT_BY_ZEROING))
    if unexact:
        semantics.unverified = (f"removing {'/'.join(unexact)} units is not the same as zeroing them (norms and "
                                f"rotary embeddings see the width), so only the loss is measured")
    return semantics


def _read_only_as_linear_weight(gm: GraphModule) -> set[str]:
    """Attribute names whose every read is the weight argument of an `aten.linear`."""
    ok: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        uses = list(node.users)
        ok[node.target] = ok.get(node.target, True) and bool(uses) and all(
            u.op == "call_function" and u.target == torch.ops.aten.linear.default and len(u.args) > 1
            and u.args[1] is node and node not in u.args[:1] and node not in u.args[2:]
            and node not in u.kwargs.values() for u in uses)
    return {name for name, good in ok.items() if good}


__all__ = ["zeroed_semantics", "EXACT_BY_ZEROING"]
