"""Which linears `fuse_projections` may fuse: candidates that read one input, checked and
bucketed by what must agree for their fusion to be exact (see `kinds.py`).

A candidate is any node of a linear kind (`LAYOUTS`) whose tensors are stored attributes read
by it alone. Candidates reading the same x form an input group; inside it, members with equal
compatibility keys (same kind, options, dtypes and off-axis sizes, adapter method) fuse. Every
candidate of an input group that cannot join a fused bucket is reported with the reason.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import get_attr, matches_any
from fxforge.passes.projections.kinds import LAYOUTS, Layout, arg, arg_name, kind_name

ADAPTERS_META = "fxforge_adapters"  # fxforge.passes.adapters.common.ADAPTERS (not imported: no cycle)

Key = tuple[tuple[str, Any], ...]


@dataclass
class Member:
    """One linear that may join a fused group."""

    node: Node
    layout: Layout
    path: str                 # its module path ("model.layers.0.self_attn.q_proj")
    out_features: int
    key: Key                  # members fuse only with members of an equal key
    record: str | None = None  # the key of its adapter record in gm.meta, if it has one
    # not part of the key: a missing bias fuses as zeros of the others' dtype
    bias_dtype: str | None = None


@dataclass
class Plan:
    """What the pass will do: groups to fuse (each in graph order) and (where, why) skips."""

    groups: list[list[Member]]
    skipped: list[tuple[str, str]]


def plan_groups(gm: GraphModule, targets: Sequence[str] | None, exclude: Sequence[str],
                include_lm_head: bool, min_group: int) -> Plan:
    """Find every fusable group of `gm`; nothing is changed."""
    by_input: dict[Node, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYOUTS or not isinstance(arg(node, 0), Node):
            continue
        path = module_path(node)
        if not include_lm_head and "lm_head" in path.rsplit(".", 1)[-1]:
            continue
        if (targets is not None and not matches_any(path, targets)) or (exclude and matches_any(path, exclude)):
            continue
        by_input[arg(node, 0)].append(node)
    readers = _attr_readers(gm)
    records = _adapter_records_by_weight(gm)
    quantized_bases = _qlora_base_nodes(gm)
    plan = Plan(groups=[], skipped=[])
    for nodes in by_input.values():
        if len(nodes) < 2:
            continue  # nothing shares its input: not a candidate, not a skip
        members: list[Member] = []
        for node in nodes:
            found = _member(gm, node, readers, records, quantized_bases)
            if isinstance(found, str):
                plan.skipped.append((module_path(node), found))
            else:
                members.append(found)
        _bucket(members, min_group, plan)
    return plan


def module_path(node: Node) -> str:
    """The module path of a linear-kind node: its first stored tensor's owner, as linear_sites says."""
    first = arg(node, 1)
    if isinstance(first, Node) and first.op == "get_attr" and "." in first.target:
        return first.target.rsplit(".", 1)[0]
    return node.meta.get("module_path", "") or node.name


def _member(gm: GraphModule, node: Node, readers: Counter, records: dict[str, str],
            quantized_bases: set[str]) -> Member | str:
    """A Member, or the reason this linear cannot be fused."""
    layout = LAYOUTS[node.target]
    kind = kind_name(node.target)
    if node.name in quantized_bases:
        return (f"{kind} is the base of a QLoRA adapter branch, which merge_adapters finds by node name; "
                f"merge or leave the adapters before fusing")
    operands = list(layout.tensor_args())
    bias = arg(node, layout.bias) if layout.bias is not None else None
    if bias is not None:
        operands.append(layout.bias)
    for index in operands:
        value = arg(node, index)
        if not (isinstance(value, Node) and value.op == "get_attr"):
            return (f"{kind}'s {arg_name(node.target, index)} is computed in the graph, not a stored tensor "
                    f"(e.g. LoRA-SB's R·A): there is nothing to concatenate")
        if readers[value.target] > 1:
            return (f"{kind}'s {arg_name(node.target, index)} '{value.target}' is also read by another node "
                    f"(a tied or shared tensor): fusing would copy it")
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return f"{kind} has no shape metadata (node.meta['val']); run the pass through a pipeline"
    record = records.get(arg(node, 1).target)
    if record is not None:
        roles = gm.meta[ADAPTERS_META][record]["tensors"].values()
        stored = {arg(node, i).target for i in operands}
        if not set(roles) <= stored:
            return (f"its adapter record holds tensors that are not operands of {kind} "
                    f"({sorted(set(roles) - stored)}), which a fused record could not name")
    return Member(node=node, layout=layout, path=module_path(node), out_features=int(val.shape[-1]),
                  key=_key(gm, node, layout, record), record=record,
                  bias_dtype=str(get_attr(gm, bias.target).dtype) if bias is not None else None)


def _key(gm: GraphModule, node: Node, layout: Layout, record: str | None) -> Key:
    """What must be equal for two members to fuse exactly, as (what, value) pairs."""
    target = node.target
    key: list[tuple[str, Any]] = [("kind", kind_name(target))]
    key += [(arg_name(target, i), arg(node, i)) for i in layout.options]
    for i in layout.shared:
        key.append((arg_name(target, i), tuple(get_attr(gm, arg(node, i).target).flatten().tolist())))
    for i, axis in layout.rows.items():
        tensor = get_attr(gm, arg(node, i).target)
        off_axis = tuple(s for d, s in enumerate(tensor.shape) if d != axis)
        key.append((f"{arg_name(target, i)} dtype and off-axis shape", (str(tensor.dtype), off_axis)))
    if layout.low_rank is not None:
        lora_a, lora_b = (get_attr(gm, arg(node, i).target) for i in layout.low_rank[:2])
        key.append(("A/B dtypes", (str(lora_a.dtype), str(lora_b.dtype))))
    if layout.sparse is not None:
        values = get_attr(gm, arg(node, layout.sparse[1]).target)
        key.append(("values dtype", str(values.dtype)))
    if record is not None:
        rec = gm.meta[ADAPTERS_META][record]
        key.append(("adapter method", rec["method"]))
        key.append(("adapter roles", tuple(sorted(rec["tensors"]))))
    return tuple(key)


def _bucket(members: list[Member], min_group: int, plan: Plan) -> None:
    """Split one input group by kind, then by key: buckets of `min_group` or more fuse; every
    other member is skipped with the reason, except an op that only pairs with another kind of
    its own layer (EasyQuant's linear_sparse outliers beside their linear_wq)."""
    by_kind: dict[str, list[Member]] = defaultdict(list)
    for member in members:
        by_kind[dict(member.key)["kind"]].append(member)
    for kind, same_kind in by_kind.items():
        buckets: dict[Key, list[Member]] = defaultdict(list)
        for member in same_kind:
            buckets[member.key].append(member)
        for key, bucket in buckets.items():
            mixed_bias = _bias_dtypes(bucket)
            if len(bucket) >= min_group and len(mixed_bias) <= 1:
                plan.groups.append(bucket)
                continue
            others = [b for k, b in buckets.items() if k != key]
            strangers = [m for m in members if dict(m.key)["kind"] != kind]
            for member in bucket:
                if len(mixed_bias) > 1:
                    why = f"the biases of its group differ in dtype ({sorted(mixed_bias)}); a fused bias needs one"
                elif others:
                    why = _difference(member, max(others, key=len)[0])
                elif len(bucket) > 1 or not strangers:
                    why = (f"only {len(bucket)} compatible linears read this input, fewer than "
                           f"min_group={min_group}")
                elif all(m.path == member.path for m in strangers):
                    continue  # one layer computed by two ops: not a projection group
                else:
                    other = next(m for m in strangers if m.path != member.path)
                    why = (f"shares its input with {other.path}, which is {dict(other.key)['kind']}, not {kind}: "
                           f"kinds fuse only with their own")
                plan.skipped.append((member.path, why))


def _bias_dtypes(bucket: list[Member]) -> set[str]:
    return {m.bias_dtype for m in bucket if m.bias_dtype is not None}


def _difference(member: Member, other: Member) -> str:
    """"… differs from model.layers.0.q_proj: group_size 32 vs 64" for a mismatched member."""
    mine, theirs = dict(member.key), dict(other.key)
    diffs = [f"{what} {mine.get(what)!r} vs {theirs.get(what)!r}"
             for what in dict.fromkeys([*mine, *theirs]) if mine.get(what) != theirs.get(what)]
    return (f"{mine['kind']} shares its input with {other.path} but cannot fuse with it exactly: "
            + "; ".join(diffs))


def _attr_readers(gm: GraphModule) -> Counter:
    """attribute name -> how many nodes read it (through any get_attr node)."""
    readers: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] += len(node.users)
    return readers


def _adapter_records_by_weight(gm: GraphModule) -> dict[str, str]:
    """base weight attribute -> the key of its adapter record (float-base adapters only)."""
    records = gm.meta.get(ADAPTERS_META, {})
    return {rec["weight"]: path for path, rec in records.items() if not rec.get("quantized")}


def _qlora_base_nodes(gm: GraphModule) -> set[str]:
    """Names of linear_wq nodes a QLoRA record points at (merge_adapters looks them up by name)."""
    records = gm.meta.get(ADAPTERS_META, {})
    return {name for rec in records.values() for name in rec.get("base_nodes", ())}
