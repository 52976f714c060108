"""Pass `medusa_greedy_verify`: a KV-cached graph with Medusa heads accepts a tree of guesses itself.

    + input tree_parents (N,), + outputs accepted node, next token (1,);
    heads output -> the heads' logits at the accepted node (K, 1, 1, V).

The graph accepts a candidate tree greedily (`runtime.greedy_verify`), one call per Medusa step;
it updates the graph's `MedusaLayout` (`runtime.layouts`).

Verification: with every parent -1 (no tree: every node is accepted) the logits and the cache are
unchanged, the accepted node is the deepest (the highest position, the first of equal ones: the
last for a prompt), the next token is the argmax of its logits and the heads' logits are those the
graph before gave at that node.
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
from fxforge.passes.split_medusa_heads import REORDERED, plain_heads, separable_heads
from fxforge.runtime.greedy_verify import verify_greedily_in_place
from fxforge.runtime.layouts import kv_layout, medusa_layout
from fxforge.runtime.medusa_split import hidden_in_place_of_heads


@register_pass
@dataclass(frozen=True)
class MedusaGreedyVerify(Pass):
    """Verify a tree of head guesses greedily inside the KV-cached graph (`runtime.greedy_verify`)."""

    name = "medusa_greedy_verify"

    def tolerance(self) -> Tolerance:
        return REORDERED

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layout = plain_heads(gm, self.name)
        cache = kv_layout(gm.meta)
        if cache is None or cache.padding_mask:
            raise PassError(f"pass '{self.name}': needs a graph with a KV cache and a tree mask: run add_kv_cache "
                            "(attention_mask=False, the default) first.", pass_name=self.name)
        heads = separable_heads(gm, self.name)
        verify_greedily_in_place(hidden_in_place_of_heads(gm), heads)
        return PassResult(gm, sites=layout.num_heads, example_inputs=_with_parents(gm, ctx.example_inputs))

    def verify(self, before: GraphModule, after: GraphModule, ctx: PassContext) -> Comparison:
        """No tree (every parent -1): all accepted, so the deepest node, its token and heads come back."""
        heads, cache = medusa_layout(before.meta), kv_layout(before.meta)
        ref = run_graph(before, ctx.example_inputs)
        got = run_graph(after, _with_parents(after, ctx.example_inputs))
        # every node accepted: the deepest wins (the highest position, the first of equal ones)
        best = int(ctx.example_inputs[cache.position_ids][0].argmax())
        after_layout = medusa_layout(after.meta)
        checks = [compare_tensors(ref[i], got[i], self.tolerance(), index=i)
                  for i in range(len(ref)) if i != heads.heads_output]
        expected = {
            heads.heads_output: ref[heads.heads_output][:, :1, best:best + 1],
            after_layout.best_output: torch.tensor([best]),
            after_layout.next_token_output: ref[cache.logits_output][0, best].argmax().reshape(1),
        }
        checks += [compare_tensors(want, got[i], self.tolerance(), index=i) for i, want in expected.items()]
        if len(got) != len(ref) + 2:
            return Comparison(outputs=checks, structural=f"{len(got)} outputs, expected {len(ref) + 2}")
        return Comparison(outputs=checks)


def _with_parents(gm: GraphModule, flat: tuple) -> tuple:
    """`flat` (the cached graph's inputs) plus tree_parents = -1 for every new token (no tree)."""
    layout = kv_layout(gm.meta)
    ids = flat[layout.input_ids]
    inputs = list(flat)
    inputs.insert(layout.tree_parents, torch.full((ids.shape[1],), -1, dtype=torch.long))
    return tuple(inputs)


__all__ = ["MedusaGreedyVerify"]
