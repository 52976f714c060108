"""The causal mask of a cached graph, computed in the graph from an HF-style padding mask.

`add_kv_cache(attention_mask=True)` gives the graph an `attention_mask` (B, P + L) input
(1 = token, 0 = padding; left padding as HF generate writes it) and builds from it the
(B, 1, L, P + L) bool mask its attention sites read:

    query i sits at key position P + i;  key j visible  <=>  j <= P + i  and  attention_mask[b, j] != 0
    ... or j == P + i (the query itself)

The last clause keeps every row non-empty: a padding query (all keys before it are padding)
would otherwise attend to nothing, and a softmax over nothing is NaN that then flows into the
cached keys/values of that position and, through 0 · NaN, into every later step. Padding
positions' outputs are never read, so letting them see themselves changes no real token.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten
MASK_TAG = "fxforge_kv_mask"  # nodes of the mask: `add_kv_cache` must not read their aranges as positions


def padding_tree_mask(graph: Graph, after: Node, ids: Node, attention_mask: Node, fake_mask: torch.Tensor) -> Node:
    """Insert, after `after`, nodes computing the (B, 1, L, P + L) bool mask; return its node.

    `ids` is the (B, L) new-token input, `attention_mask` the (B, P + L) padding mask;
    `fake_mask` is the result's fake value (symbolic shape) for the passes that read it.
    """
    device = ids.meta["val"].device
    nodes: list[Node] = []

    def call(target, *args, **kwargs) -> Node:
        node = graph.call_function(target, args, kwargs)
        node.meta[MASK_TAG] = True
        nodes.append(node)
        return node

    with graph.inserting_before(after.next):  # in creation order, all after `after`
        total = call(aten.sym_size.int, attention_mask, 1)
        length = call(aten.sym_size.int, ids, 1)
        offset = call(operator.sub, total, length)
        keys = call(aten.arange.default, total, dtype=torch.long, device=device)
        queries = call(aten.arange.start, offset, total, dtype=torch.long, device=device)
        key_row = call(aten.unsqueeze.default, keys, 0)          # (1, T)
        query_col = call(aten.unsqueeze.default, queries, 1)     # (L, 1)
        causal = call(aten.le.Tensor, key_row, query_col)        # (L, T)
        itself = call(aten.eq.Tensor, key_row, query_col)        # (L, T)
        visible = call(aten.ne.Scalar, attention_mask, 0)        # (B, T)
        visible = call(aten.unsqueeze.default, call(aten.unsqueeze.default, visible, 1), 2)  # (B, 1, 1, T)
        allowed = call(aten.logical_and.default, visible, causal)  # (B, 1, L, T)
        mask = call(aten.logical_or.default, allowed, itself)
    mask.meta["val"] = fake_mask
    return mask


__all__ = ["MASK_TAG", "padding_tree_mask"]
