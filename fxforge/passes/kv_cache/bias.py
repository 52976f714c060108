"""Additive position biases (ALiBi) under a KV cache, for pass `add_kv_cache`.

A fused attention's `bias` was traced for L queries over L keys. Cached, the op sees the L new
queries over P + L keys, so the bias is recomputed over the total length: its subgraph is
copied with every use of the traced length L (a `sym_size` equal to it) replaced by P + L (the
tree mask's key length), and, if it has a query axis, sliced to the last L rows (the new
tokens are the last positions). Parts of the subgraph that do not depend on L are shared, not
copied. A bias read from an input's values (a padding mask) cannot be recomputed and is
refused, as padding masks are.

The copies are tagged with `KV_BIAS_TAG` so that `add_kv_cache`'s position rewiring, which
replaces `arange(L)` position rows by `position_ids`, leaves the bias's key positions alone.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from fxforge.errors import PassError
from fxforge.passes.attention.masks import mask_sources_placeholder
from fxforge.passes.attention.rules import fake, same_size

aten = torch.ops.aten
KV_BIAS_TAG = "fxforge_kv_bias"


class BiasExtender:
    """Recomputes fused-attention biases over the cached length; shares copies between layers."""

    def __init__(self, graph: Graph, tree_mask: Node, pass_name: str):
        self.graph = graph
        self.tree_mask = tree_mask
        self.pass_name = pass_name
        self.traced_len = fake(tree_mask).shape[2]  # the symbol of the new tokens' length L
        self._copies: dict[Node, Node] = {}
        self._depends: dict[Node, bool] = {}
        self._total: Node | None = None
        self._new_len: Node | None = None

    def extend(self, bias: Node, attention: Node) -> Node:
        """The bias `attention` needs in the cached graph: (..., L or 1, P + L)."""
        source = mask_sources_placeholder(bias)
        if source is not None:
            raise PassError(
                f"pass '{self.pass_name}': the position bias of attention '{attention.name}' is computed from "
                f"{input_dependence(bias, source)}; the cached graph cannot recompute it over the cache.",
                pass_name=self.pass_name, node=attention.name)
        val = fake(bias)
        if not self._depends_on_length(bias):
            if val is not None and val.dim() >= 1 and not same_size(val.shape[-1], 1):
                raise PassError(
                    f"pass '{self.pass_name}': the position bias of attention '{attention.name}' has a key axis "
                    f"of {val.shape[-1]} that does not follow the sequence length; cannot extend it over the "
                    "cache.", pass_name=self.pass_name, node=attention.name)
            return bias
        with self.graph.inserting_before(attention):
            extended = self._copy(bias)
            if val is not None and val.dim() >= 2 and not same_size(val.shape[-2], 1):
                # queries are the last L of the P + L positions: rows P .. P + L - 1
                start = self._tagged(operator.sub, (self._total_len(), self._new_length()), bias)
                extended = self._tagged(aten.slice.Tensor, (extended, val.dim() - 2, start, self._total_len()), bias)
        return extended

    # ------------------------------------------------------------------ helpers

    def _is_length(self, node: Node) -> bool:
        return node.op == "call_function" and node.target == aten.sym_size.int and \
            same_size(node.meta.get("val"), self.traced_len)

    def _depends_on_length(self, node: Node) -> bool:
        if node not in self._depends:
            self._depends[node] = self._is_length(node) or any(
                self._depends_on_length(n) for n in node.all_input_nodes if n.op != "placeholder")
        return self._depends[node]

    def _copy(self, node: Node) -> Node:
        """`node` recomputed with L -> P + L (nodes independent of L are reused as they are)."""
        if self._is_length(node):
            return self._total_len()
        if not self._depends_on_length(node):
            return node
        if node not in self._copies:
            args = _map(node.args, self._copy_arg)
            kwargs = _map(node.kwargs, self._copy_arg)
            self._copies[node] = self._tagged(node.target, args, node, kwargs)
        return self._copies[node]

    def _copy_arg(self, value: Any) -> Any:
        return self._copy(value) if isinstance(value, Node) else value

    # Created at the insertion point of the first bias that needs them (before its attention,
    # so before every later one too); never between the placeholders, which are still growing.
    def _total_len(self) -> Node:
        if self._total is None:
            self._total = self.graph.call_function(aten.sym_size.int, (self.tree_mask, 3))
        return self._total

    def _new_length(self) -> Node:
        if self._new_len is None:
            self._new_len = self.graph.call_function(aten.sym_size.int, (self.tree_mask, 2))
        return self._new_len

    def _tagged(self, target: Any, args: tuple, like: Node, kwargs: dict | None = None) -> Node:
        node = self.graph.call_function(target, args, kwargs or {})
        node.meta["module_path"] = like.meta.get("module_path", "")
        node.meta[KV_BIAS_TAG] = True
        return node


_WEIGHTED = (aten.linear.default, aten.matmul.default, aten.bmm.default, aten.mm.default)


def input_dependence(node: Node, source: Node) -> str:
    """What a mask/bias computed from input `source` reads, for an error message: the model's
    activations (a content-dependent mask or bias, named by the nearest projection it comes
    from, e.g. Doge's dynamic mask from `dt_proj`), or the input's values directly (a padding
    mask: the fix is to trace with input_ids only)."""
    queue, seen = [node], set()
    while queue:
        current = queue.pop(0)  # breadth first: the projection nearest to the mask
        if current in seen or current.op == "placeholder" or current.target == aten.sym_size.int:
            continue
        seen.add(current)
        if current.target in _WEIGHTED:
            where = current.meta.get("module_path") or current.name
            return (f"the model's activations (through '{where}'): a content-dependent mask or bias, which "
                    "add_kv_cache does not recompute over the cached tokens (it caches keys and values only); "
                    "such models are not supported by add_kv_cache")
        queue.extend(current.all_input_nodes)
    return f"input '{source.name}' (a padding mask); trace the model with input_ids only"


def _map(value: Any, fn) -> Any:
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


__all__ = ["BiasExtender", "KV_BIAS_TAG", "input_dependence"]
