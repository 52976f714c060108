"""The graph edit of `fuse_projections`: one fused op, split back into the members' outputs.

    y_q = op(x, Wq, ...); y_k = op(x, Wk, ...); y_v = op(x, Wv, ...)
        -> y = op(x, cat(Wq, Wk, Wv), ...);  y_q, y_k, y_v = split_with_sizes(y, [q, k, v], -1)

The consumers read getitems of the split, so they are unchanged. The fused tensors are new
attributes under `<common parent>.fused_<members>` (the fused node's module path); the
members' tensors become unused and `erase_dead` drops them, so the weights are held once.
Metadata that names the members' tensors moves to the fused ones: sparsity masks
(`sparsify`) are concatenated, adapter records (`add_adapters`) become one record of the fused
layer, so `reapply_masks`, `merge_adapters` and `save_adapters` keep working.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import add_attr, delete_attr, get_attr
from fxforge.passes.projections.groups import ADAPTERS_META, Member
from fxforge.passes.projections.kinds import Layout, arg

aten = torch.ops.aten
MASKS_META = "fxforge_sparsity_masks"  # fxforge.passes.prune.sparsify.MASKS_META


def fused_path(members: list[Member]) -> str:
    """`<common parent>.fused_<member suffixes>`: "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj"."""
    parts = [m.path.split(".") for m in members]
    common: list[str] = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        common.append(atoms[0])
    common = common[: min(len(p) for p in parts) - 1]  # a parent, never a member itself
    suffix = "_".join("_".join(p[len(common):]) for p in parts)
    return ".".join([*common, f"fused_{suffix}"])


def fuse_group(gm: GraphModule, members: list[Member]) -> Node:
    """Replace `members` (graph order, equal keys) by one fused op and a split; return the op node."""
    first = members[0].node
    layout = members[0].layout
    path = fused_path(members)
    arity = len(first.target._schema.arguments)
    args: list[Any] = [arg(first, i) for i in range(arity)]
    renamed: dict[int, str] = {}  # argument index -> the fused attribute's name

    def store(index: int, value: Tensor, like: str | None = None) -> None:
        """Register `value` as the fused operand `index`, named and kinded like attribute `like`."""
        like = like or arg(first, index).target
        node = add_attr(gm, f"{path}.{like.rsplit('.', 1)[-1]}", value.contiguous(), **_kind_of(gm, like),
                        before=first)
        args[index] = node
        renamed[index] = node.target

    for index, axis in layout.rows.items():
        store(index, torch.cat([_tensor(gm, m.node, index) for m in members], dim=axis))
    if layout.bias is not None:
        bias = _fused_bias(gm, members, layout)
        if bias is not None:  # named after the first member that has one
            store(layout.bias, bias, like=next(arg(m.node, layout.bias).target for m in members
                                                 if arg(m.node, layout.bias) is not None))
    if layout.low_rank is not None:
        a_index, b_index, s_index = layout.low_rank
        lora_a, lora_b, scale = _fused_low_rank(gm, members, layout.low_rank)
        store(a_index, lora_a)
        store(b_index, lora_b)
        args[s_index] = scale
    if layout.sparse is not None:
        i_index, v_index, n_index = layout.sparse
        indices, values = _fused_sparse(gm, members, layout.sparse)
        store(i_index, indices)
        store(v_index, values)
        args[n_index] = sum(m.out_features for m in members)

    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(first.target, tuple(args))
    fused.meta["module_path"] = path
    # metadata first: it reads the members' operands, which erasing a node clears
    _move_masks(gm, members, layout, renamed)
    _merge_adapter_records(gm, members, layout, renamed, path, fused, args)
    with gm.graph.inserting_after(fused):
        split = gm.graph.call_function(aten.split_with_sizes.default,
                                       (fused, [m.out_features for m in members], -1))
    split.meta["module_path"] = path
    anchor = split
    operands = [a for m in members for a in m.node.args if isinstance(a, Node) and a.op == "get_attr"]
    for i, member in enumerate(members):
        with gm.graph.inserting_after(anchor):
            part = gm.graph.call_function(operator.getitem, (split, i))
        # each part stands for one member's output: it keeps that member's provenance
        part.meta.update({k: v for k, v in member.node.meta.items()
                          if k in ("module_path", "nn_module_stack", "val")})
        member.node.replace_all_uses_with(part)
        gm.graph.erase_node(member.node)
        anchor = part
    _drop_unread(gm, operands)
    return fused


def _drop_unread(gm: GraphModule, operands: list[Node]) -> None:
    """Delete the members' tensors now, not at the end of the pass: the weights stay one copy
    plus one group while the pass runs (a member's tensor is read by it alone; plan_groups checked)."""
    for node in dict.fromkeys(operands):
        if not node.users:
            gm.graph.erase_node(node)
            delete_attr(gm, node.target)


def _tensor(gm: GraphModule, node: Node, index: int) -> Tensor:
    return get_attr(gm, arg(node, index).target).detach()


def _kind_of(gm: GraphModule, name: str) -> dict[str, Any]:
    """add_attr options keeping what `name` is: a buffer, or a parameter that trains or not."""
    value = get_attr(gm, name)
    if not isinstance(value, torch.nn.Parameter):
        return {"buffer": True}
    return {"buffer": False, "trainable": value.requires_grad}


def _fused_bias(gm: GraphModule, members: list[Member], layout: Layout) -> Tensor | None:
    """Biases side by side; a member without one contributes zeros, which add exactly nothing.

    Zero-filling (rather than fusing only members of equal bias presence) lets q/k/v fuse in
    models that give only some projections a bias, at the cost of a few zero adds.
    """
    biases = [arg(m.node, layout.bias) for m in members]
    if all(b is None for b in biases):
        return None
    dtype = next(get_attr(gm, b.target).dtype for b in biases if b is not None)
    return torch.cat([get_attr(gm, b.target).detach() if b is not None else torch.zeros(m.out_features, dtype=dtype)
                      for b, m in zip(biases, members)])


def _fused_low_rank(gm: GraphModule, members: list[Member], where: tuple[int, int, int]
                    ) -> tuple[Tensor, Tensor, float]:
    """(A stacked along the rank, B block-diagonal, scale) of a LoRA-style group.

    Member i's rows of B·A are B_i·A_i: the other members' ranks meet zeros in B. Equal scales
    stay the op's scale (bitwise the members' arithmetic); differing ones fold into their B
    blocks and the fused scale is 1.
    """
    a_index, b_index, s_index = where
    factors_a = [_tensor(gm, m.node, a_index) for m in members]
    factors_b = [_tensor(gm, m.node, b_index) for m in members]
    scales = [float(arg(m.node, s_index)) for m in members]
    if len(set(scales)) == 1:
        return torch.cat(factors_a), torch.block_diag(*factors_b), scales[0]
    return torch.cat(factors_a), torch.block_diag(*(b * s for b, s in zip(factors_b, scales))), 1.0


def _fused_sparse(gm: GraphModule, members: list[Member], where: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """COO entries of the stacked sparse matrices: each member's rows offset by those before it."""
    i_index, v_index, _ = where
    indices, offset = [], 0
    for member in members:
        entries = _tensor(gm, member.node, i_index).clone()
        entries[0] += offset
        indices.append(entries)
        offset += member.out_features
    return torch.cat(indices, dim=1), torch.cat([_tensor(gm, m.node, v_index) for m in members])


def _move_masks(gm: GraphModule, members: list[Member], layout: Layout, renamed: dict[int, str]) -> None:
    """Sparsity masks of the members' weights become one mask of the fused weight (ones where none)."""
    masks = gm.meta.get(MASKS_META)
    if not masks:
        return
    for index, axis in layout.rows.items():
        names = [arg(m.node, index).target for m in members]
        if not any(n in masks for n in names):
            continue
        parts = [masks.pop(n) if n in masks else torch.ones_like(get_attr(gm, n), dtype=torch.bool) for n in names]
        masks[renamed[index]] = torch.cat(parts, dim=axis)


def _merge_adapter_records(gm: GraphModule, members: list[Member], layout: Layout, renamed: dict[int, str],
                           path: str, fused: Node, args: list[Any]) -> None:
    """The members' adapter records become one record of the fused layer (same method and roles).

    Its tensors are the fused ones, its rank the stacked rank (LoRA-style) and its scale the
    fused op's, so merge_adapters folds W + s·B·A of the fused layer, which is the members'
    merged weights side by side. `fused_from` lists the member layers.
    """
    if members[0].record is None:
        return
    records = gm.meta[ADAPTERS_META]
    olds = [records.pop(m.record) for m in members]
    first_node, first = members[0].node, olds[0]
    position = {arg(first_node, i).target: i for i in renamed if isinstance(arg(first_node, i), Node)}
    record = dict(first)
    record["tensors"] = {role: renamed[position[name]] for role, name in first["tensors"].items()}
    record["weight"] = renamed[1]
    record["bias"] = renamed.get(layout.bias) if layout.bias is not None else None
    record["nodes"] = [fused.name]
    record["out_features"] = sum(m.out_features for m in members)
    if layout.low_rank is not None:
        record["rank"] = int(get_attr(gm, renamed[layout.low_rank[0]]).shape[0])
        record["scale"] = float(args[layout.low_rank[2]])
    alphas = {old["alpha"] for old in olds}
    record["alpha"] = alphas.pop() if len(alphas) == 1 else None
    record["fused_from"] = [m.path for m in members]
    records[path] = record
