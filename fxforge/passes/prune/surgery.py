"""The physical rewrite behind structured pruning: remove units of coupling groups everywhere.

Given, for some atomic axes of a `CouplingAnalysis`, the units to remove, this slices every
parameter/buffer along each dim built from those axes and rewrites every literal size in the
graph that describes such a dim: `view`/`reshape`/`expand` sizes (`view(b, s, 4, 16)` ->
`view(b, s, 3, 16)`; `-1` and symbolic sizes need no change), `split` sizes (GPT-2's fused
qkv split), `layer_norm` shapes and a depthwise conv's `groups`. Shapes are then re-propagated by `finalize`. The analysis
already blocked every group whose sizes appear anywhere else (factories, slices), so after
this nothing in the graph still mentions the old width.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.depgraph import CouplingAnalysis
from fxforge.ir.graph import get_attr, set_attr

aten = torch.ops.aten

Pruned = dict[int, set[int]]  # atomic axis (Group.leaf) -> units to remove

_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
# tensor factories: index of their size list (a literal pruned size blocks the group in the
# analysis; a symbolic one, batch × heads, is rewritten like a view's)
_SYM_ARITHMETIC = {operator.mul, operator.floordiv}
_FACTORY_SIZES = {aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0,
                  aten.full.default: 0, aten.new_zeros.default: 1, aten.new_ones.default: 1,
                  aten.new_empty.default: 1, aten.new_full.default: 1}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}  # same (x, _, dim) args
_LAYER_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.convolution.default}


def slice_parameters(gm: GraphModule, analysis: CouplingAnalysis, pruned: Pruned) -> dict[str, tuple]:
    """Index-select every parameter/buffer along its pruned dims; returns name -> (old, new) shape."""
    changed = {}
    for name, dims in analysis.params.items():
        tensor = get_attr(gm, name)
        new = tensor
        for d, axis in enumerate(dims):
            if analysis.touched(axis, pruned):
                keep = torch.tensor(analysis.keep_indices(axis, pruned), dtype=torch.long)
                new = new.index_select(d, keep)
        if new is not tensor:
            trainable = tensor.requires_grad if isinstance(tensor, torch.nn.Parameter) else None
            set_attr(gm, name, new.contiguous(), trainable=trainable)
            changed[name] = (tuple(tensor.shape), tuple(new.shape))
    return changed


def rewrite_sizes(gm: GraphModule, analysis: CouplingAnalysis, pruned: Pruned) -> int:
    """Rewrite literal sizes of pruned dims in view/reshape/expand/split/layer_norm nodes."""
    rewritten = 0
    scaled: dict[tuple, Node] = {}  # (old size node, new, old) -> its rewrite, shared by its users
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        out = analysis.dims.get(node)
        if out is None:
            continue
        if node.target in _SIZED or node.target in _FACTORY_SIZES:
            at = 1 if node.target in _SIZED else _FACTORY_SIZES[node.target]
            sizes = list(node.args[at])
            for k, (size, axis) in enumerate(zip(sizes, out)):
                if not analysis.touched(axis, pruned):
                    continue
                # view(b, s, 4, 16): literal sizes describe the old width; -1 adapts
                if isinstance(size, int) and size != -1:
                    sizes[k] = analysis.new_size(axis, pruned)
                elif isinstance(size, Node):  # view(x, [b * 4, s, 8]): batch × heads, computed
                    sizes[k] = _scaled_size(gm, analysis, axis, pruned, size, scaled)
            if sizes != list(node.args[at]):
                node.args = (*node.args[:at], sizes, *node.args[at + 1:])
                rewritten += 1
        elif node in analysis.slice_parts:
            # qkv[..., 32:48] -> qkv[..., 24:36]: a part's bounds are the kept widths before it
            parts, i = analysis.slice_parts[node]
            if any(analysis.touched(p, pruned) for p in parts):
                start = sum(analysis.new_size(p, pruned) for p in parts[:i])
                args = list(node.args) + [None] * (4 - len(node.args))
                args[2], args[3] = start, start + analysis.new_size(parts[i], pruned)
                node.args = tuple(args)
                node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("start", "end")}
                rewritten += 1
        elif node.target in _SPLITS:
            x = analysis.dims[node.args[0]]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            dim = dim + len(x) if dim < 0 else dim
            if analysis.touched(x[dim], pruned):
                # split(x, 64, 2) -> split_with_sizes(x, [48, 48, 48], 2): parts may now differ
                sizes = [analysis.new_size(part[dim], pruned) for part in out]
                node.target = aten.split_with_sizes.default
                node.args = (node.args[0], sizes, dim)
                node.kwargs = {}
                rewritten += 1
        elif node.target in _CONVS:
            # a depthwise conv's `groups` is its channel count (the analysis couples only those)
            index = 8 if node.target == aten.convolution.default else 6
            groups = node.args[index] if len(node.args) > index else node.kwargs.get("groups", 1)
            x = analysis.dims[node.args[0]]
            if isinstance(groups, int) and groups != 1 and analysis.touched(x[1], pruned):
                new = analysis.new_size(x[1], pruned)
                if len(node.args) > index:
                    node.args = (*node.args[:index], new, *node.args[index + 1:])
                else:
                    node.kwargs = {**node.kwargs, "groups": new}
                rewritten += 1
        elif node.target in _LAYER_NORMS:
            x = analysis.dims[node.args[0]]
            k = len(node.args[1])
            if any(analysis.touched(axis, pruned) for axis in x[-k:]):
                shape = [analysis.new_size(axis, pruned) for axis in x[-k:]]
                node.args = (node.args[0], shape, *node.args[2:])
                rewritten += 1
    return rewritten


def rescale_means(gm: GraphModule, analysis: CouplingAnalysis, pruned: Pruned, leaves: set[int]) -> int:
    """After every mean over a dim that loses units of `leaves`: × new/old width, so it stays
    sum/old — what it computed with those units zeroed (a norm over all heads, OLMoE's q_norm,
    BitNet's sub-norm, keeps its scale; the pruned graph computes exactly the zeroed one)."""
    chosen = {leaf: units for leaf, units in pruned.items() if leaf in leaves}
    count = 0
    for node, ratio in analysis.mean_rescales(pruned):
        if not any(analysis.touched(axis, chosen) for axis in _reduced_axes(analysis, node)):
            continue
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(aten.mul.Tensor, (node, ratio))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        count += 1
    return count


def _reduced_axes(analysis: CouplingAnalysis, node: Node) -> list[int]:
    x = analysis.dims[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [x[d + len(x) if d < 0 else d] for d in dims]


def _scaled_size(gm: GraphModule, analysis: CouplingAnalysis, axis: int, pruned: Pruned,
                 size: Node, done: dict[tuple, Node]) -> Node:
    """A node computing the symbolic size `size` of `axis` after pruning: size · new // old,
    with old/new the product of the axis's static factors (the heads) before/after; the
    symbolic factors (the batch) are never pruned, so the division is exact."""
    old = new = 1
    for factor in analysis.ax.factors(axis):
        width = analysis.ax.size[factor]
        if isinstance(width, int):
            old, new = old * width, new * analysis.new_size(factor, pruned)
    key = (size, new, old)
    if key not in done:
        with gm.graph.inserting_after(size):
            if (size.op == "call_function" and size.target == operator.mul and len(size.args) == 2
                    and old in size.args and any(isinstance(a, Node) for a in size.args)):
                other = next(a for a in size.args if isinstance(a, Node))
                done[key] = gm.graph.call_function(operator.mul, (other, new))  # b * 4 -> b * 3
            else:
                times = gm.graph.call_function(operator.mul, (size, new))
                with gm.graph.inserting_after(times):
                    done[key] = gm.graph.call_function(operator.floordiv, (times, old))
    return done[key]


def apply_pruning(gm: GraphModule, analysis: CouplingAnalysis, pruned: Pruned,
                  rescale_leaves: set[int] | None = None) -> dict:
    """Remove `pruned` units from `gm` in place (weights and graph sizes); returns what changed.

    rescale_leaves: atomic axes whose removal must compute what zeroing them does; the means
    over them are rescaled (`rescale_means`). The prune pass passes its head/channel groups.
    The caller runs `finalize(gm)` afterwards (the pipeline does) to re-propagate shapes.
    """
    pruned = {leaf: set(units) for leaf, units in pruned.items() if units}
    params = slice_parameters(gm, analysis, pruned)
    sizes = rewrite_sizes(gm, analysis, pruned)
    means = rescale_means(gm, analysis, pruned, rescale_leaves or set())
    for node in reversed(list(gm.graph.nodes)):  # sizes of the old widths nothing reads now
        if node.op == "call_function" and node.target in _SYM_ARITHMETIC and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return {"parameters": params, "size_rewrites": sizes, "rescaled_means": means}


def linear_nodes_by_weight(gm: GraphModule) -> dict[str, list[Node]]:
    """Weight name -> the `aten.linear` nodes that read it."""
    out: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            w = node.args[1]
            if isinstance(w, Node) and w.op == "get_attr":
                out.setdefault(w.target, []).append(node)
    return out
