"""Pass `split_medusa_heads`: a graph with Medusa heads returns their input, for decoding.

Takes a graph with heads (`add_medusa_heads`, before or after `add_kv_cache`) and rewrites what it
returns; updates the graph's `MedusaLayout` (`runtime.layouts`):

    heads output (K, B, L, V)  ->  the heads' input, hidden (B, L, d)

The heads then run apart (`runtime.medusa_split.heads_graph` of the graph before), on the one
position a decoding step needs them at. `medusa_greedy_verify` (its own file) is the other way to
decode: the tree is accepted inside the graph.

Verification (the pass changes the outputs, so it compares its own way, like add_kv_cache): every
other output is unchanged and the heads applied to the returned hidden state give the logits the
graph returned before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.verify import Comparison, Tolerance, compare_tensors, run_graph
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.runtime.layouts import MedusaLayout, medusa_layout
from fxforge.runtime.medusa_split import heads_graph, hidden_in_place_of_heads

# The heads on one position and on all of them sum the same products in another order.
REORDERED = Tolerance(max_abs=1e-4, rtol=1e-4)


def plain_heads(gm: GraphModule, pass_name: str) -> MedusaLayout:
    """The graph's MedusaLayout, refusing graphs without heads or already prepared for decoding."""
    layout = medusa_layout(gm.meta)
    if layout is None:
        raise PassError(f"pass '{pass_name}': the graph has no Medusa heads; run add_medusa_heads first.",
                        pass_name=pass_name)
    if layout.heads_apart or layout.verifies_in_graph:
        raise PassError(f"pass '{pass_name}': the Medusa heads were already split off or verify in-graph; "
                        "run split_medusa_heads or medusa_greedy_verify once, not both.", pass_name=pass_name)
    return layout


def separable_heads(gm: GraphModule, pass_name: str) -> GraphModule:
    heads = heads_graph(gm)
    if heads is None:
        raise PassError(f"pass '{pass_name}': the Medusa heads cannot be told apart from the backbone (a pass "
                        "after add_medusa_heads rewrote them); decode with the heads inside the graph.",
                        pass_name=pass_name)
    return heads


@register_pass
@dataclass(frozen=True)
class SplitMedusaHeads(Pass):
    """Return the Medusa heads' input (the hidden state) instead of their logits, for decoding."""

    name = "split_medusa_heads"

    def tolerance(self) -> Tolerance:
        return REORDERED

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layout = plain_heads(gm, self.name)
        separable_heads(gm, self.name)
        hidden_in_place_of_heads(gm)
        return PassResult(gm, sites=layout.num_heads, notes={"hidden_output": layout.heads_output})

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """Other outputs unchanged; heads(hidden returned) == the head logits returned before."""
        layout = medusa_layout(before.meta)
        ref, got = run_graph(before, ctx.example_inputs), list(run_graph(after, ctx.example_inputs))
        with torch.no_grad():
            got[layout.heads_output] = heads_graph(before)(got[layout.heads_output])[0]
        return Comparison(outputs=[compare_tensors(r, g, self.tolerance(), index=i)
                                   for i, (r, g) in enumerate(zip(ref, got))])


__all__ = ["SplitMedusaHeads", "plain_heads", "separable_heads", "REORDERED"]
