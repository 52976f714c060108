"""AWQ (arXiv 2306.00978): activation-aware scales, folded into the producer, then clip search.

For each group of linears reading the same tensor (q/k/v after the attention norm, gate/up after
the MLP norm, down after up): x̄_j = mean|x_j| over calibration tokens; for α in {0, 1/grid, ...}:
s = x̄^α (≥1e-4), s /= sqrt(max(s)·min(s)); the group's output error of Q(W·diag(s))·diag(s)⁻¹ on
the calibration rows is measured; the best α wins (α = 0 is plain RTN, so the search never loses
on the calibration data). W ← W·diag(s) and 1/s is folded into the producer so the float graph
stays equivalent:

    x = w_norm * rmsnorm(h)            -> w_norm /= s
    x = layer_norm(h, w, b) [view]     -> w /= s, b /= s
    x = act(gate) * up(h)              -> rows of up's weight and bias /= s

A group with any other producer (o_proj after attention, GPT-2's c_proj after GELU) keeps s = 1.
Then clip search: per output row and group, try max·(1 - i/20), i = 0..9, keep the lowest output
error (skipped for q/k, whose error the softmax amplifies in ways this proxy does not see).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, aten, get_attr, set_attr
from fxforge.ir.reference import Semantics
from fxforge.calibration.observers import InputStatistics
from fxforge.passes.methods import register_method
from fxforge.passes.quantize.common import check_option
from fxforge.passes.quantize.method import FAMILY, QuantizedLayer, WeightQuantizer
from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec, quantize_matrix

CLIP_SEARCH_ROWS = 512   # calibration rows used by the clip search (as the reference code does)
SCALE_SEARCH_ROWS = 2048
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def fake_quant_weight(weight: Tensor, spec: QuantSpec, group_axis: str, clip: Tensor | float = 1.0) -> Tensor:
    """ŵ (N, K) of weight (N, K) under RTN with the given grouping and clip."""
    if group_axis == "in":
        return quantize_matrix(weight, spec, clip).dequantize()
    return quantize_matrix(weight.T.contiguous(), spec, clip).dequantize().T


def _param(node: Any) -> str | None:
    return node.target if isinstance(node, Node) and node.op == "get_attr" else None


def find_producer(gm: GraphModule, x: Node, members: set[Node]) -> list[tuple[str, str]] | None:
    """[(param name, "vector"|"rows")] that scale the linear input x when divided by s, or None."""
    if any(u not in members for u in x.users):
        return None  # x also feeds something else (a residual): scaling it would change that too
    if x.target == aten.mul.Tensor:
        a, b = x.args[:2]
        for weight, other in ((a, b), (b, a)):
            name = _param(weight)
            if name is not None and get_attr(gm, name).dim() == 1:
                return [(name, "vector")]  # w_norm * normed
            if isinstance(weight, Node) and weight.target == aten.linear.default and _param(weight.args[1]) \
                    and len(weight.users) == 1 and other is not weight:
                bias = _param(weight.args[2]) if len(weight.args) > 2 else None
                return [(weight.args[1].target, "rows")] + ([(bias, "vector")] if bias else [])
        return None
    norm = x
    if x.target in _VIEWS and isinstance(x.args[0], Node) and len(x.args[0].users) == 1 \
            and x.meta.get("val") is not None and x.args[0].meta.get("val") is not None \
            and x.meta["val"].shape[-1] == x.args[0].meta["val"].shape[-1]:
        norm = x.args[0]
    if norm.target == aten.layer_norm.default:
        params = [_param(a) for a in norm.args[2:4]]
        if params and params[0]:
            return [(p, "vector") for p in params if p]
    return None


def apply_awq_scales(gm: GraphModule, sites: list[LinearSite], specs: Mapping[str, QuantSpec],
                     stats: Mapping[str, InputStatistics], grid: int, group_axis: str,
                     semantics: Semantics | None = None) -> dict[str, Any]:
    """Search and fold AWQ scales for every group of sites sharing an input; returns a report.

    `grid`: alphas 0, 1/grid, ..., (grid-1)/grid. Each producer divided by s is recorded in
    `semantics` (the result claims to compute with the rescaled producer; the scaled weights
    are recorded when they are quantized). The group's shared input samples are divided by s
    too, so the clip search sees the inputs the scaled weights will get."""
    groups: dict[Node, list[LinearSite]] = defaultdict(list)
    for site in sites:
        groups[site.input].append(site)
    alphas, folded, skipped = {}, 0, []
    for x, members in groups.items():
        producer = find_producer(gm, x, {m.node for m in members})
        if producer is None:
            skipped.append(members[0].module_path)
            continue
        first = stats[members[0].node.name]  # members read one input: one InputStatistics
        scale, alpha = _search_scale(gm, members, specs, first, grid, group_axis)
        # New tensors, never in-place writes: the graph shares its tensors with the graph
        # before this pass (and the user's model), see passes/cow.py.
        for site in members:
            weight = get_attr(gm, site.weight_name)
            set_attr(gm, site.weight_name, weight * scale.to(weight.dtype), trainable=weight.requires_grad)
        first.scale_samples(scale)
        for name, kind in producer:
            target = get_attr(gm, name)
            scaled = target / (scale[:, None] if kind == "rows" else scale).to(target.dtype)
            set_attr(gm, name, scaled, trainable=target.requires_grad if isinstance(target, torch.nn.Parameter) else None)
            if semantics is not None:
                semantics.replace_weight(name, scaled)
        alphas[members[0].module_path] = alpha
        folded += 1
    return {"groups_scaled": folded, "alphas": alphas, "no_foldable_producer": skipped}


def _search_scale(gm: GraphModule, members: list[LinearSite], specs: Mapping[str, QuantSpec],
                  stats: InputStatistics, grid: int, group_axis: str) -> tuple[Tensor, float]:
    x = stats.sample()[:SCALE_SEARCH_ROWS]
    mean_abs = stats.mean_abs
    weights = [get_attr(gm, m.weight_name).detach().float() for m in members]
    reference = torch.cat([x @ w.T for w in weights], dim=-1)
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat([x @ (fake_quant_weight(w * s, specs[m.node.name], group_axis) / s).T
                         for w, m in zip(weights, members)], dim=-1)
        err = float((out - reference).pow(2).mean())
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def quantize_weight_awq(matrix: Tensor, spec: QuantSpec, stats: InputStatistics, group_axis: str,
                        clip_search: bool = True) -> QuantizedMatrix:
    """RTN of the (already scaled) matrix with AWQ's per-(row, group) clip search."""
    if not clip_search:
        return quantize_matrix(matrix, spec)
    x = stats.sample()[:CLIP_SEARCH_ROWS]
    rows, cols = matrix.shape
    groups = cols // spec.group_size
    best_err = torch.full((rows, groups, 1), float("inf"))
    best_clip = torch.ones(rows, groups, 1)
    for i in range(10):
        ratio = 1.0 - i / 20
        delta = quantize_matrix(matrix, spec, ratio).dequantize() - matrix
        delta = delta.reshape(rows, groups, spec.group_size)
        if group_axis == "in":  # output error of row n from group G: Σ_t (X_tG · δ_nG)²
            xg = x.reshape(-1, groups, spec.group_size)
            err = torch.einsum("tgk,ngk->tng", xg, delta).pow(2).sum(0)
        else:  # row j of Wᵀ is input channel j: its output error is E[x_j²]·Σ δ²
            err = x.pow(2).mean(0)[:, None] * delta.pow(2).sum(-1)
        better = err[..., None] < best_err
        best_err = torch.where(better, err[..., None], best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, ratio), best_clip)
    return quantize_matrix(matrix, spec, best_clip)


# --------------------------------------------------------------------------- the method


def is_query_or_key(site: LinearSite) -> bool:
    """AWQ skips clip search on q/k: their error is amplified by the softmax, not seen in q·Wᵀ MSE."""
    leaf = site.module_path.rsplit(".", 1)[-1]
    return leaf in ("q_proj", "k_proj", "query", "key", "c_attn", "qkv_proj", "Wqkv")


@register_method(FAMILY)
@dataclass(frozen=True)
class Awq(WeightQuantizer):
    """quantize(method=awq): activation-aware scales folded into the producer, then clip search.

    awq_grid: alphas 0, 1/grid, ..., (grid-1)/grid tried for the scales.
    clip_search: search a clip ratio per output row and group (not on q/k).
    """

    name = "awq"
    needs_calibration = True
    statistics = ("abs_mean", "samples")
    awq_grid: int = 20
    clip_search: bool = True

    def __post_init__(self) -> None:
        check_option(isinstance(self.awq_grid, int) and self.awq_grid > 0,
                     f"quantize: awq_grid={self.awq_grid!r} must be a positive integer")

    def prepare_block(self, gm, sites, specs, stats, group_axis, semantics) -> dict:
        return {"awq": apply_awq_scales(gm, sites, specs, stats, self.awq_grid, group_axis, semantics)}

    def quantize(self, matrix, spec, site, stats, group_axis) -> QuantizedLayer:
        return QuantizedLayer(quantize_weight_awq(matrix, spec, stats, group_axis,
                                                  clip_search=self.clip_search and not is_query_or_key(site)))
