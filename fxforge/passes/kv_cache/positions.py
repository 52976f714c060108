"""Two more spellings of "the position of each token" that `add_kv_cache` rewires to position_ids.

The traced graph computes positions for the L tokens of the call; cached, those tokens sit after
P past ones, so every position computation must read the `position_ids` input instead.
`add_kv_cache._rewire_positions` handles the `unsqueeze(arange(L), 0)` row and BERT's arange
buffer; this file adds:

- **Counted positions**: `cumsum(m, dim=1)` of a (B, L) per-token mask `m`, either all ones
  (OPT: `cumsum(ones(B, L))`) or "not padding" (RoBERTa and its family:
  `cumsum(input_ids != padding_idx)`, then `* m + padding_idx`). Over the new tokens alone the
  count restarts at 1; with the cache it must be the token's position + 1. So the cumsum is
  replaced by `position_ids + 1`. For the ones mask that is exact; for the padding mask it is
  exact when position_ids counts the non-padding tokens before each token, which is what HF's
  generate passes (`cumsum(attention_mask) - 1`); the `* m` that follows still gives padding
  tokens padding_idx, per token.
- **Position tables**: `embedding(table, arange(L))` (a (L, D) sinusoidal table, RoFormer)
  unsqueezed to (1, L, D): the lookup is redone on position_ids, giving (B, L, D).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.ancestors import ancestors

aten = torch.ops.aten

# ops a per-token mask is built from: each output element reads only its own token's ids
_PER_TOKEN = {
    aten.ne.Scalar, aten.eq.Scalar, aten.ne.Tensor, aten.eq.Tensor, aten.to.dtype, aten.to.dtype_layout,
    aten._to_copy.default, aten.type_as.default, aten.ones.default, aten.ones_like.default,
    aten.new_ones.default, aten.full.default, aten.full_like.default, aten.mul.Tensor,
    aten.logical_not.default, aten.bitwise_not.default, aten.logical_and.default, aten.__and__.Tensor,
    aten.sym_size.int, aten.expand.default, aten.clone.default,
}
# ops a looked-up position row goes through between arange(L) and unsqueeze(0)
_ROW_OPS = {aten.embedding.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
            aten.add.Tensor, aten.mul.Tensor}


def rewire_counted_positions(gm: GraphModule, ids: Node, positions: Node) -> int:
    """Replace each `cumsum(per-token mask (B, L), 1)` by `position_ids + 1`; return how many."""
    from fxforge.passes.kv_cache.add_kv_cache import same_length

    seq = ids.meta["val"].shape[1]
    rewired = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.cumsum.default:
            continue
        mask, dim = node.args[0], node.args[1]
        val = mask.meta.get("val") if isinstance(mask, Node) else None
        if not (isinstance(val, torch.Tensor) and val.dim() == 2 and dim in (1, -1)
                and same_length(val.shape[1], seq) and _per_token(mask, ids)):
            continue
        dtype = node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else torch.long
        with gm.graph.inserting_before(node):
            count = gm.graph.call_function(aten.add.Tensor, (positions, 1))
            count = gm.graph.call_function(aten.to.dtype, (count, dtype))
        node.replace_all_uses_with(count)
        rewired += 1
    return rewired


def _per_token(node: Node, ids: Node) -> bool:
    """Whether `node` is computed elementwise from input_ids and constants alone."""
    for current in ancestors(node, through=lambda n: n.target != aten.sym_size.int):
        if current.op == "placeholder":
            if current is not ids:
                return False
        elif current.op != "call_function" or current.target not in _PER_TOKEN:
            return False
    return True


def rewire_position_table(gm: GraphModule, arange: Node, positions: Node) -> int:
    """`unsqueeze(f(arange(L)), 0)` with f a table lookup (and casts/offsets): redo f on
    position_ids (B, L) and use that in place of the (1, L, ...) row. Returns 1 if rewired."""
    chain, row = [], arange
    while len(row.users) == 1:
        user = next(iter(row.users))
        if user.target == aten.unsqueeze.default and user.args[1] == 0:
            break
        if user.target not in _ROW_OPS:
            return 0
        chain.append(user)
        row = user
    else:
        return 0
    unsqueeze = next(iter(row.users))
    if not any(n.target == aten.embedding.default for n in chain):
        return 0  # a plain row: the caller's `unsqueeze(arange [+ 0], 0)` rule
    value, previous = positions, arange
    with gm.graph.inserting_before(unsqueeze):
        for node in chain:
            args = _replace(node.args, previous, value)
            kwargs = _replace(node.kwargs, previous, value)
            copy = gm.graph.call_function(node.target, args, kwargs)
            copy.meta["module_path"] = node.meta.get("module_path", "")
            value, previous = copy, node
    unsqueeze.replace_all_uses_with(value)
    return 1


def _replace(value: Any, old: Node, new: Node) -> Any:
    if isinstance(value, tuple):
        return tuple(_replace(v, old, new) for v in value)
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return new if value is old else value


__all__ = ["rewire_counted_positions", "rewire_position_table"]
