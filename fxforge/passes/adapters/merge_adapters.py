"""Pass `merge_adapters`: fold adapters into their base weights (`unmerge_adapters` undoes it).

    fxforge.lora_linear(x, W, b, A, B, s)  ->  aten.linear(x, W + s·B·A, b)     (each method's
    fxforge.dora_linear(x, W, b, A, B, m, s) -> aten.linear(x, m/‖V‖·V, b)       merged_weight)

Exact up to float rounding. The merged graph has plain linears only, so it exports to ONNX and
runs on every backend with no adapter op. `merge_adapters(keep=True)` (the default) remembers
each merged layer's adapter tensors in the graph's metadata so `unmerge_adapters` can restore
the adapted graph, for the methods whose merge is invertible; `keep=False` forgets them.
Adapters on a quantized base merge into a dequantized float linear (not restorable: the
integer weights are gone); re-run `quantize` on the merged graph to get an integer model back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import add_attr, erase_dead, get_attr, set_attr
from fxforge.ir.ops import op_name_of
from fxforge.ir.verify import Tolerance
from fxforge.passes.adapters.common import (
    adapter_records,
    adapter_tensors,
    freeze_all_but_adapters,
    get_method,
    recorded_nodes,
)
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass

aten = torch.ops.aten
MERGED = "fxforge_merged_adapters"  # gm.meta key: {module_path: record + "values": {role: tensor}}


def _adapter_nodes(gm: GraphModule, record: dict) -> list[Node]:
    if record.get("quantized"):  # the branch sits beside the integer base: names only
        by_name = {n.name: n for n in gm.graph.nodes}
        nodes = [by_name.get(name) for name in record["nodes"]]
        nodes = None if None in nodes else nodes
    else:
        nodes = recorded_nodes(gm, record["nodes"], record["weight"],
                               lambda n: op_name_of(n.target) is not None)  # the adapter op (bone has two forms)
    if nodes is None:
        raise PassError(f"the adapter nodes {record['nodes']} recorded in the graph's metadata are missing; "
                        f"the graph was edited after add_adapters", pass_name="merge_adapters")
    return nodes


def _replace_with_linear(gm: GraphModule, node: Node, x: Node, weight: Node, bias: Node | None) -> Node:
    """aten.linear(x, weight, bias) takes `node`'s place (metadata and users)."""
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(aten.linear.default, (x, weight, bias))
    linear.meta.update({k: v for k, v in node.meta.items() if k in ("module_path", "nn_module_stack", "val")})
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)
    return linear


def _merge_into_dequantized(gm: GraphModule, path: str, record: dict, method, nodes: list[Node],
                            tensors: dict) -> None:
    """QLoRA layer: dequantize the int base, fold the update in, one float aten.linear replaces both."""
    from fxforge.passes.adapters.quantized_base import bias_of, dequantized_weight

    by_name = {n.name: n for n in gm.graph.nodes}
    bases = [by_name[name] for name in record["base_nodes"] if name in by_name]
    if len(bases) != len(record["base_nodes"]):
        raise PassError(f"the quantized base nodes {record['base_nodes']} recorded in the graph's metadata are "
                        "missing; the graph was edited after add_adapters", pass_name="merge_adapters")
    weight = method.merged_weight(dequantized_weight(gm, bases[0]), tensors, record["scale"])
    w_node = add_attr(gm, f"{path}.weight", weight, buffer=False, trainable=False, before=bases[0])
    for node, base in zip(nodes, bases):
        _replace_with_linear(gm, node, base.args[0], w_node, bias_of(base))


def _merges_exactly(gm: GraphModule, record: dict) -> bool:
    from fxforge.passes.adapters.quantized_base import merges_exactly

    by_name = {n.name: n for n in gm.graph.nodes}
    return all(merges_exactly(by_name[name]) for name in record["base_nodes"] if name in by_name)


@register_pass
@dataclass(frozen=True)
class MergeAdapters(Pass):
    """Fold every adapter into its base weight; the adapter nodes and tensors disappear."""

    name = "merge_adapters"
    consumes = frozenset({"adapter"})  # passes/compatibility.py
    produces = "linear"
    keep: bool = True  # keep the adapter tensors in gm.meta so unmerge_adapters can restore them

    def tolerance(self) -> Tolerance:
        return Tolerance(max_abs=1e-4, rtol=1e-4)  # W + s·B·A rounds once more than the two-branch sum

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        records = adapter_records(gm)
        merged = gm.meta.setdefault(MERGED, {})
        done: list[str] = []
        skipped: list[tuple[str, str]] = []
        for path, record in list(records.items()):
            done.append(path)
            method = get_method(record["method"])
            nodes = _adapter_nodes(gm, record)
            tensors = {k: v.detach().float() for k, v in adapter_tensors(gm, record).items()}
            if record.get("quantized"):
                if not _merges_exactly(gm, record):
                    skipped.append((path, "its quantized base also quantizes activations, so a float weight with "
                                          "the update folded in would compute something else; the adapter stays"))
                    done.remove(path)
                    continue
                _merge_into_dequantized(gm, path, record, method, nodes, tensors)
                del records[path]
                continue
            weight = get_attr(gm, record["weight"])
            new_weight = method.merged_weight(weight.detach().float(), tensors, record["scale"])
            set_attr(gm, record["weight"], new_weight.to(weight.dtype), trainable=False)
            linears = [_replace_with_linear(gm, node, node.args[0], node.args[1], node.args[2]) for node in nodes]
            if self.keep:
                merged[path] = {**record, "nodes": [n.name for n in linears],
                                "values": {k: v.detach().clone() for k, v in adapter_tensors(gm, record).items()}}
            del records[path]
        erase_dead(gm)
        freeze_all_but_adapters(gm)
        # nothing to merge is not an error (a model may or may not carry adapters), but never silent
        if not done and not skipped:
            skipped = [("<graph>", "no adapters to merge: add them with add_adapters first")]
        return PassResult(gm, sites=len(done), skipped=skipped,
                          notes={"merged": sorted(done), "restorable": sorted(merged) if self.keep else []})
