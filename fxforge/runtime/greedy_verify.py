"""Greedy Medusa verification inside the graph: one call returns the accepted node and its heads.

Split decoding (`fxforge.medusa.decoder`) runs, per step, the backbone over the tree, then in
Python the argmax of every node's logits and the walk along the tree, then a second call for
the heads at the accepted node. On a CPU those extras cost a third of a step. This module
appends them to the cached graph itself, as TensorRT-LLM does for Medusa on GPUs:

    pred[i]    = argmax(logits[i])                         the base model's next token after node i
    match[j]   = ids[j] == pred[parent[j]]  or  parent[j] < 0     (the root always matches)
    ok[i]      = match[j] for every ancestor j of i        (ancestors: the tree mask's last N columns)
    best       = argmax(ok ? position + 1 : -1)            the deepest accepted node, first on ties
    outputs    : best, pred[best] (the next root), heads(hidden[best])   (K, 1, 1, V)

which is `medusa_tree.greedy_accept` exactly (nodes come in depth order, argmax keeps the first
of equal depths). With every parent < 0 (`tree_parents` left at its default) all nodes are
accepted and `best` is the last one: a prefill's heads are the ones at the prompt's end.
Only batch row 0 is verified: Medusa decodes one sequence.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

from fxforge.ir.graph import erase_dead, finalize, get_attr, has_attr, set_attr
from fxforge.ir.trace import IN_SPEC, INPUT_NAMES
from fxforge.errors import InputError
from fxforge.runtime.layouts import kv_layout, medusa_layout
from fxforge.runtime.meta_keys import KV_META, MEDUSA_META

aten = torch.ops.aten
_TO_THE_END = 2 ** 62  # a slice end past any length (exported as INT64's range end)


def add_greedy_verification(main: GraphModule, heads: GraphModule) -> GraphModule:
    """A copy of `main` that verifies a tree greedily and runs `heads` at the accepted node.

    main: a cached graph whose Medusa heads output was replaced by the hidden state
    (`medusa.split_heads_for_decoding`); heads: hidden (B, L, d) -> (K, B, L, V).
    The copy takes one more input, `tree_parents` (N,) int64 (-1 for the root); its heads
    output holds the heads' logits at the accepted node, (K, 1, 1, V), and two outputs are
    appended: the accepted node's index and the next token, both (1,) int64.
    (The pass `medusa_greedy_verify` does this, verified, on a graph with heads.)
    """
    return verify_greedily_in_place(copy.deepcopy(main), heads)


def verify_greedily_in_place(gm: GraphModule, heads: GraphModule) -> GraphModule:
    """`add_greedy_verification` rewriting `gm` itself (a pass's private copy)."""
    graph = gm.graph
    layout, medusa = kv_layout(gm.meta), medusa_layout(gm.meta)
    if layout is None or medusa is None or not medusa.heads_apart:
        raise InputError("greedy verification needs a KV-cached graph returning the hidden state in place of "
                         "the Medusa heads' logits (passes add_kv_cache and split_medusa_heads)")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if layout.padding_mask:
        raise InputError("in-graph Medusa verification needs a tree mask: compile with add_kv_cache "
                         "(attention_mask=False, the default), not add_kv_cache(attention_mask=True)")
    ids, positions, mask = (placeholders[i] for i in (layout.input_ids, layout.position_ids, layout.mask))
    past_key = placeholders[layout.past[0][0]]
    output = graph.output_node()
    outputs = list(output.args[0])
    logits, hidden = outputs[layout.logits_output], outputs[medusa.hidden_output]

    with graph.inserting_after(placeholders[-1]):
        parents = graph.placeholder("tree_parents")
    ids_val = ids.meta["val"]
    with ids_val.fake_mode:
        parents.meta["val"] = torch.empty(ids_val.shape[1], dtype=torch.long)

    def call(target: Any, *args: Any) -> Node:
        return graph.call_function(target, args)

    with graph.inserting_before(output):
        pred = call(aten.argmax.default, call(aten.select.int, logits, 0, 0), -1)               # (N,)
        parent_pred = call(aten.index_select.default, pred, 0, call(aten.clamp.default, parents, 0))
        match = call(aten.logical_or.default, call(aten.eq.Tensor, call(aten.select.int, ids, 0, 0), parent_pred),
                     call(aten.lt.Scalar, parents, 0))
        past_len = call(aten.sym_size.int, past_key, 2)
        tree_rows = call(aten.select.int, call(aten.select.int, mask, 0, 0), 0, 0)            # (N, P + N)
        ancestors = call(aten.slice.Tensor, tree_rows, 1, past_len, _TO_THE_END)            # (N, N)
        failed = call(aten.logical_and.default, ancestors, call(aten.logical_not.default, match))
        ok = call(aten.logical_not.default, call(aten.any.dim, failed, 1))
        depth_score = call(aten.add.Tensor, call(aten.select.int, positions, 0, 0), 1)
        score = call(aten.where.ScalarOther, ok, depth_score, -1)
        best = call(aten.unsqueeze.default, call(aten.argmax.default, score), 0)             # (1,)
        next_token = call(aten.index_select.default, pred, 0, best)
        best_hidden = call(aten.index_select.default, call(aten.select.int, hidden, 0, 0), 0, best)  # (1, d)
        head_logits = _inline(gm, heads, call(aten.unsqueeze.default, best_hidden, 0))    # (K, 1, 1, V)

    outputs[medusa.hidden_output] = head_logits
    output.args = (tuple(outputs) + (best, next_token),)
    erase_dead(gm)
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    gm.meta[INPUT_NAMES] = names
    gm.meta[IN_SPEC] = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
    gm.meta[KV_META] = layout.replace(tree_parents=names.index(parents.name), num_inputs=len(names),
                                      num_outputs=len(outputs) + 2)
    gm.meta[MEDUSA_META] = medusa.replace(heads_output=medusa.hidden_output, hidden_output=None,
                                          best_output=len(outputs), next_token_output=len(outputs) + 1)
    return finalize(gm)


def _inline(gm: GraphModule, sub: GraphModule, argument: Node) -> Node:
    """Copy `sub`'s nodes into `gm` (its one placeholder := argument); return its single output.

    The weights `sub` reads are shared into `gm` under the same names (they are the heads'
    parameters, which the split removed from the main graph, or the LM head both use).
    """
    graph, env = gm.graph, {}
    for node in sub.graph.nodes:
        if node.op == "get_attr" and not has_attr(gm, node.target):
            set_attr(gm, node.target, get_attr(sub, node.target))
        if node.op == "placeholder":
            env[node] = argument
        elif node.op == "output":
            return env[node.args[0][0]]
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    raise ValueError("the heads graph has no output")


__all__ = ["add_greedy_verification", "verify_greedily_in_place"]
