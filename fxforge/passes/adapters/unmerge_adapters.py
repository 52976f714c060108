"""Pass `unmerge_adapters`: restore the adapters `merge_adapters(keep=True)` folded into weights.

For each merged layer the method's `unmerged_weight` recovers the base weight (W - s·B·A for
the low-rank methods, block inverses for Bone) and the adapter node and tensors come back,
trainable as before. DoRA's merge cannot be inverted (the pre-merge norm is gone) and layers
merged on a quantized base were not kept; both are reported as skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, linear_sites
from fxforge.ir.verify import Tolerance
from fxforge.passes.adapters.common import (
    LayerInit,
    add_adapter_to_site,
    adapter_records,
    freeze_all_but_adapters,
    get_method,
    recorded_nodes,
)
from fxforge.passes.adapters.merge_adapters import MERGED
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class UnmergeAdapters(Pass):
    """Undo `merge_adapters(keep=True)`: restore each base weight and its adapter node."""

    name = "unmerge_adapters"

    def tolerance(self) -> Tolerance:
        return Tolerance(max_abs=1e-4, rtol=1e-4)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        merged = gm.meta.get(MERGED, {})
        if not merged:
            raise PassError("unmerge_adapters: this graph has no merged adapters to restore (merge with "
                            "merge_adapters(keep=True) first)", pass_name=self.name)
        records = adapter_records(gm)
        sites = {s.node.name: s for s in linear_sites(gm, include_lm_head=True)}
        skipped, count = [], 0
        for path, record in list(merged.items()):
            method = get_method(record["method"])
            values = record["values"]
            weight = get_attr(gm, record["weight"])
            base = method.unmerged_weight(weight.detach().float(), {k: v.float() for k, v in values.items()},
                                          record["scale"])
            nodes = recorded_nodes(gm, record["nodes"], record["weight"], lambda n: n.name in sites)
            group = [sites[n.name] for n in nodes] if nodes else [None]
            if base is None or None in group:
                skipped.append((path, "the merge of this method is not invertible" if base is None
                                else "its merged linear is no longer in the graph"))
                continue
            trainable = {k: v for k, v in values.items() if k in record["trainable"]}
            frozen = {k: v for k, v in values.items() if k not in record["trainable"]}
            init = LayerInit(trainable=trainable, frozen=frozen, rank=record["rank"], scale=record["scale"],
                             base_weight=base.to(weight.dtype))
            records[path] = add_adapter_to_site(gm, group, method, init, record["alpha"], record["options"])
            del merged[path]
            count += len(group)
        freeze_all_but_adapters(gm)
        return PassResult(gm, sites=count, skipped=skipped)
