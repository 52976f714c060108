"""What every adapter method shares: the method interface, adding adapter tensors to the graph,
marking which parameters train, and the record of adapters that merge/save/load read.

A method (one file each: lora.py, pissa.py, ...) is a frozen dataclass registered with
`@register_method("add_adapters")` (`fxforge.passes.methods`); its fields are its own options
(EVA's eva_rho, LoRA-GA's ga_gamma, ...). It says three things about one linear layer: how to
initialize its tensors (`init`), how to compute the adapted layer in the graph (`emit`, one
fxforge op node whose first three arguments are the base x, W, b), and what the merged weight
is (`merged_weight`). `add_adapter_to_site` does the graph edit the same way for all of
them, and `gm.meta[ADAPTERS]` records, per adapted layer, the method, rank, scale and the
attribute names of its tensors, so `merge_adapters` and `save_adapters` never guess.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, add_attr, get_attr, set_attr
from fxforge.passes.methods import Method, methods_of

FAMILY = "add_adapters"  # the methods' family in fxforge.passes.methods

ADAPTERS = "fxforge_adapters"  # gm.meta key: {module_path: AdapterRecord as dict}


@dataclass
class LayerInit:
    """What a method produces for one layer.

    trainable / frozen: role -> tensor (e.g. "lora_A"); frozen ones are parameters without grad.
    base_weight: the residual weight replacing W (PiSSA, OLoRA, ...), or None to keep W.
    rank, scale: what this layer ended up with (EVA redistributes ranks).
    """

    trainable: dict[str, Tensor]
    rank: int
    scale: float
    frozen: dict[str, Tensor] = field(default_factory=dict)
    base_weight: Tensor | None = None


@dataclass
class LayerContext:
    """What a method reads to initialize one layer."""

    site: LinearSite
    weight: Tensor            # the base weight (out, in), as stored
    rank: int
    alpha: float
    generator: torch.Generator
    data: Any = None          # what `prepare` computed for this layer (EVA components, LoRA-GA gradient)


@dataclass(frozen=True)
class AdapterMethod(Method):
    """Base class of the adapter methods; subclasses are frozen dataclasses whose fields are
    their options, registered with `@register_method("add_adapters")`.

    recorded_options: options that shape the emitted graph, saved in the adapter record (so
    `unmerge_adapters` and adapter files rebuild the same form).
    """

    op_name: ClassVar[str] = "lora_linear"
    changes_base_weight: ClassVar[bool] = False  # residual methods rewrite W at init
    rounds_at_init: ClassVar[bool] = False       # the init is exact in real numbers only (DoRA's m/‖W‖)
    adapts_quantized: ClassVar[bool] = False     # a plain low-rank update: can sit beside linear_wq (QLoRA)
    recorded_options: ClassVar[tuple[str, ...]] = ()

    def scale(self, rank: int, alpha: float) -> float:
        """s in y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (LoRA: α/r)."""
        return alpha / rank

    def max_rank(self, in_features: int, out_features: int) -> int:
        """The largest rank the layer allows."""
        return min(in_features, out_features)

    def prepare(self, gm: GraphModule, sites: list[LinearSite], ctx: Any, rank: int) -> dict[str, Any]:
        """Data-driven methods compute per-layer data here ({module_path: data}); others need none.

        `ctx` is the PassContext; `rank` the rank asked for (EVA redistributes it)."""
        return {}

    def init(self, layer: LayerContext) -> LayerInit:  # pragma: no cover - abstract
        raise NotImplementedError

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        """(op overload, args) computing the adapted layer; default: fxforge::lora_linear(x, W, b, A, B, s)."""
        x, w, b = base_args(site)
        return torch.ops.fxforge.lora_linear.default, (x, w, b, nodes["lora_A"], nodes["lora_B"], scale)

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        """W after folding the adapter in; default: W + s·B·A."""
        return weight + scale * (tensors["lora_B"] @ tensors["lora_A"])

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        """The base weight back from a merged one, or None where the method cannot invert its merge."""
        return merged - scale * (tensors["lora_B"] @ tensors["lora_A"])


def get_method(name: str) -> AdapterMethod:
    """The method `name` with its default options (what merge, unmerge and adapter files need:
    the merged weight and the emitted form do not depend on init options)."""
    known = _registered()
    if name not in known:
        raise ValueError(f"unknown adapter method '{name}'; known methods: {', '.join(sorted(known))}")
    return known[name]()  # type: ignore[return-value]


def known_methods() -> list[str]:
    return sorted(_registered())


def quantized_capable_methods() -> list[str]:
    """The methods whose branch can sit beside a quantized (`linear_wq`) base, QLoRA style."""
    return sorted(name for name, cls in _registered().items() if cls.adapts_quantized)


def _registered() -> dict[str, type[Method]]:
    importlib.import_module("fxforge.passes.adapters.all_methods")  # each method module registers itself
    return methods_of(FAMILY)


# --------------------------------------------------------------------------- graph edits


def base_args(site: LinearSite) -> tuple[Node, Node, Node | None]:
    """(x, W, b) nodes of a linear site."""
    node = site.node
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias


def call_before(gm: GraphModule, before: Node, target: Any, *args: Any) -> Node:
    """Insert `target(*args)` right before `before` (for adapter factors computed in the graph)."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args)
    node.meta["module_path"] = before.meta.get("module_path", "")
    return node


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """nn.Linear's default init (kaiming-uniform with a=√5): U(-1/√cols, 1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator, dtype=torch.float32) * 2 - 1).mul_(bound).to(dtype)


def add_adapter_to_site(gm: GraphModule, sites: LinearSite | list[LinearSite], method: AdapterMethod,
                        init: LayerInit, alpha: float, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register a layer's adapter tensors, swap its linear(s) for the method's op; return its record.

    `sites` are the call sites of one layer (a module called twice gives two linear nodes on one
    weight): they share one adapter, as they share the weight.
    """
    sites = [sites] if isinstance(sites, LinearSite) else list(sites)
    first = sites[0]
    if init.base_weight is not None:
        set_attr(gm, first.weight_name, init.base_weight.to(get_attr(gm, first.weight_name).dtype), trainable=False)
    nodes: dict[str, Node] = {}
    names: dict[str, str] = {}
    for role, value in [*init.trainable.items(), *init.frozen.items()]:
        node = add_attr(gm, f"{first.module_path}.{role}", value.contiguous(), buffer=False,
                        trainable=role in init.trainable, before=first.node)
        nodes[role], names[role] = node, node.target
    extra: dict[str, Any] = {}
    new_names, base_names = [], []
    for site in sites:
        target, args = method.emit(gm, site, nodes, init.scale)
        from fxforge.passes.adapters.quantized_base import emit_beside_quantized, is_quantized_linear

        if is_quantized_linear(site.node):  # QLoRA: the branch goes beside the quantized base

            new = emit_beside_quantized(gm, site, args)
            extra["quantized"] = True
            base_names.append(site.node.name)
        else:
            with gm.graph.inserting_before(site.node):
                new = gm.graph.call_function(target, args)
            new.meta.update({k: v for k, v in site.node.meta.items() if k in ("module_path", "nn_module_stack", "val")})
            site.node.replace_all_uses_with(new)
            gm.graph.erase_node(site.node)
        new_names.append(new.name)
    if base_names:
        extra["base_nodes"] = base_names
    return {
        **extra,
        "method": method.name,
        "rank": init.rank,
        "alpha": alpha,
        "scale": init.scale,
        "weight": first.weight_name,
        "bias": first.bias_name,
        "nodes": new_names,
        "in_features": first.in_features,
        "out_features": first.out_features,
        "tensors": names,
        "trainable": sorted(init.trainable),
        "options": dict(options or {}),
    }


def recorded_nodes(gm: GraphModule, names: list[str], weight_name: str, is_member: Any) -> list[Node] | None:
    """The nodes a record names, or None when they cannot all be found.

    Names are the fast path; a re-traced graph (`fxforge.load` re-exports the saved graph)
    renames nodes, so the fallback is the nodes reading the record's weight for which
    `is_member(node)` holds, in graph order — the weight's attribute name survives a re-trace.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    found = [by_name.get(name) for name in names]
    if None not in found and all(is_member(n) for n in found):
        return found
    readers = [n for n in gm.graph.nodes if n.op == "call_function" and is_member(n)
               and any(isinstance(a, Node) and a.op == "get_attr" and a.target == weight_name for a in n.args)]
    return readers if len(readers) == len(names) else None


def adapter_records(gm: GraphModule) -> dict[str, dict[str, Any]]:
    """{module_path: record} of the adapters in `gm` (empty if none)."""
    return gm.meta.setdefault(ADAPTERS, {})


def adapter_tensors(gm: GraphModule, record: dict[str, Any]) -> dict[str, Tensor]:
    """role -> the current tensor of one adapted layer."""
    return {role: get_attr(gm, name) for role, name in record["tensors"].items()}


def freeze_all_but_adapters(gm: GraphModule) -> list[str]:
    """requires_grad=True exactly on the trainable adapter tensors; returns their names."""
    trainable = {rec["tensors"][role] for rec in adapter_records(gm).values() for role in rec["trainable"]}
    for name, param in gm.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in trainable)
    return sorted(trainable)
