"""Sliding-window masks of a cached graph: the tree (or padding) mask narrowed to the last w keys.

A layer whose mask the analyser proves to be a causal sliding window (key j visible from query i
iff 0 <= i - j < w: Mistral/Qwen2/Gemma2 `sliding_window`, GPT-Neo's local layers) cannot take the
plain tree mask, which shows every past key: once the sequence is longer than w the cached model
would attend to keys the model never sees. Such a layer gets `tree_mask & (q_pos - k_pos < w)`:

- padding mask (`attention_mask=True`): columns, as transformers counts its window (cache
  positions, so left padding counts toward it): query i at P + i, key j at j.
- tree mask (`attention_mask=False`): the same columns for past keys; a new token t sits at
  P + (position_ids[t] - position_ids[0]), which is P + t for plain or left-padded decoding (the
  ids step by one) and P + its depth for a Medusa tree, so a branch counts its distance along
  itself, not across its siblings' columns.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from fxforge.passes.kv_cache.padding import MASK_TAG

aten = torch.ops.aten


class WindowMasks:
    """Builds, once per window width, the tree mask narrowed to that window."""

    def __init__(self, graph: Graph, tree_mask: Node, positions: Node, after: Node, by_columns: bool):
        self.graph, self.tree_mask, self.positions = graph, tree_mask, positions
        self.after = after  # every node goes after this one, in creation order
        self.by_columns = by_columns
        self._distance: Node | None = None
        self._masks: dict[int, Node] = {}

    def mask(self, window: int | None) -> Node:
        """The tree mask for a layer with this window (None: the tree mask itself)."""
        if window is None:
            return self.tree_mask
        if window not in self._masks:
            near = self._call(aten.lt.Scalar, self._query_key_distance(), window)
            narrowed = self._call(aten.logical_and.default, self.tree_mask, near)
            narrowed.meta["val"] = self.tree_mask.meta.get("val")
            self._masks[window] = narrowed
        return self._masks[window]

    def _call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_after(self.after):
            node = self.graph.call_function(target, args, kwargs)
        node.meta[MASK_TAG] = True  # not a position row for add_kv_cache's rewiring
        self.after = node
        return node

    def _query_key_distance(self) -> Node:
        """q_pos - k_pos, broadcastable to the (B, 1, L, P + L) mask."""
        if self._distance is not None:
            return self._distance
        call, positions = self._call, self.positions
        total = call(aten.sym_size.int, self.tree_mask, 3)
        new = call(aten.sym_size.int, positions, 1)
        past = call(operator.sub, total, new)
        device = positions.meta["val"].device
        if self.by_columns:
            queries = call(aten.unsqueeze.default, call(aten.arange.start, past, total, dtype=torch.long,
                                                        device=device), 1)            # (L, 1)
            keys = call(aten.unsqueeze.default, call(aten.arange.default, total, dtype=torch.long,
                                                     device=device), 0)               # (1, P + L)
        else:
            batch = call(aten.sym_size.int, positions, 0)
            past_pos = call(aten.arange.default, past, dtype=positions.meta["val"].dtype, device=device)
            past_pos = call(aten.expand.default, call(aten.unsqueeze.default, past_pos, 0), [batch, past])
            first = call(aten.slice.Tensor, positions, 1, 0, 1)                         # (B, 1)
            new_pos = call(aten.add.Tensor, call(aten.sub.Tensor, positions, first), past)  # (B, L)
            key_pos = call(aten.cat.default, [past_pos, new_pos], 1)                    # (B, P + L)
            queries = call(aten.unsqueeze.default, call(aten.unsqueeze.default, new_pos, 1), 3)  # (B, 1, L, 1)
            keys = call(aten.unsqueeze.default, call(aten.unsqueeze.default, key_pos, 1), 2)       # (B, 1, 1, P + L)
        self._distance = call(aten.sub.Tensor, queries, keys)
        return self._distance


__all__ = ["WindowMasks"]
