"""The Medusa heads apart from the backbone: one graph to train or decode them separately.

A graph with heads (`add_medusa_heads`) computes, after the LM head's input `hidden`, K ResBlock
stacks and their vocab projections. Training (the backbone is frozen) computes `hidden` once and
steps the heads only; decoding runs the backbone over a whole tree but the heads at one position
a step. Both need the heads as their own graph, `hidden (B, L, d) -> (K, B, L, V)`, sharing the
parameters (never copying them); `hidden_in_place_of_heads` is the other half, the graph that
returns `hidden` where it returned the heads' logits (pass `split_medusa_heads`).
"""
from __future__ import annotations

from typing import Any

from torch.fx import Graph, GraphModule

from fxforge.ir.graph import erase_dead
from fxforge.runtime.layouts import medusa_layout
from fxforge.runtime.meta_keys import MEDUSA_META


def split_backbone_and_heads(gm: Any) -> tuple[Any, Any] | None:
    """(backbone: ids -> hidden state, heads: hidden -> (K, B, L, V)) sharing `gm`'s parameters.

    None when the heads' nodes cannot be told apart (a later pass rewrote them); callers then
    run the whole graph.
    """
    layout = medusa_layout(gm.meta)
    nodes = {n.name: n for n in gm.graph.nodes}
    hidden = nodes.get(layout.hidden_node)
    stacked = gm.graph.output_node().args[0][layout.heads_output]
    if hidden is None or layout.heads_apart or layout.verifies_in_graph:
        return None
    graph = Graph()
    value_map = {hidden: graph.placeholder("hidden")}
    for node in gm.graph.nodes:
        is_head = (node.op == "get_attr" and str(node.target).startswith(layout.prefix + ".")) or \
            (node.op == "call_function" and str(node.meta.get("module_path", "")).startswith(layout.prefix))
        if not is_head:
            continue
        for inp in node.all_input_nodes:
            if inp not in value_map and inp.op == "get_attr":  # a backbone weight the heads share
                value_map[inp] = graph.node_copy(inp)
        if any(inp not in value_map for inp in node.all_input_nodes):
            return None
        value_map[node] = graph.node_copy(node, lambda n: value_map[n])
    if stacked not in value_map:
        return None
    graph.output((value_map[stacked],))
    heads = GraphModule(gm, graph)  # shares (does not copy) the head parameters
    backbone_graph = Graph()
    backbone_map: dict = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        backbone_map[node] = backbone_graph.node_copy(node, lambda n: backbone_map[n])
        if node is hidden:
            break
    backbone_graph.output((backbone_map[hidden],))
    backbone_graph.eliminate_dead_code()
    return GraphModule(gm, backbone_graph), heads


def heads_graph(gm: Any) -> Any | None:
    """The heads alone, `hidden (B, L, d) -> (K, B, L, V)`, or None when they cannot be told apart."""
    split = split_backbone_and_heads(gm)
    return None if split is None else split[1]


def hidden_in_place_of_heads(gm: GraphModule) -> GraphModule:
    """Rewrite `gm` in place to return the heads' input where it returned their logits.

    The heads' nodes and parameters leave the graph; `gm.meta[MEDUSA_META]` records the output
    as `hidden_output`.
    """
    layout = medusa_layout(gm.meta)
    hidden = next(n for n in gm.graph.nodes if n.name == layout.hidden_node)
    output = gm.graph.output_node()
    outputs = list(output.args[0])
    outputs[layout.heads_output] = hidden
    output.args = (tuple(outputs),)
    erase_dead(gm)
    gm.meta[MEDUSA_META] = layout.replace(hidden_output=layout.heads_output)
    return gm


__all__ = ["heads_graph", "hidden_in_place_of_heads", "split_backbone_and_heads"]
