"""SVFit (Sun et al., 2024): fine-tune only the top singular values of each weight.

    W = U_r·diag(σ_r)·V_rᵀ + W_e;   y = x·W_eᵀ + b + (x·(diag(σ)·V_rᵀ)ᵀ)·U_rᵀ,   σ trainable (init σ_r)

U_r and V_rᵀ are frozen; diag(σ)·V_rᵀ is composed in the graph (unsqueeze, mul) in front of
fxforge::lora_linear with scale 1. The initial output is unchanged up to rounding; merge
writes W_e + U_r·diag(σ)·V_rᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite
from fxforge.passes.adapters.common import (
    AdapterMethod,
    LayerContext,
    LayerInit,
    base_args,
    call_before,
)
from fxforge.passes.methods import register_method

aten = torch.ops.aten


def singular_triplets(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (out, r), σ_r (r,), V_rᵀ (r, in)) of `weight`, in float32."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()


def emit_scaled_rows(gm: GraphModule, site: LinearSite, values: Node, rows: Node, left: Node,
                     scale: float) -> tuple[Any, tuple]:
    """lora_linear(x, W, b, diag(values)·rows, left, scale), diag(values)·rows composed in the graph."""
    x, w, b = base_args(site)
    column = call_before(gm, site.node, aten.unsqueeze.default, values, -1)
    scaled = call_before(gm, site.node, aten.mul.Tensor, column, rows)
    return torch.ops.fxforge.lora_linear.default, (x, w, b, scaled, left, scale)


@register_method("add_adapters")
@dataclass(frozen=True)
class Svfit(AdapterMethod):
    name = "svfit"
    changes_base_weight = True

    def scale(self, rank: int, alpha: float) -> float:
        return 1.0  # the singular values carry the magnitude

    def init(self, layer: LayerContext) -> LayerInit:
        u, s, vh = singular_triplets(layer.weight, layer.rank)
        dtype = layer.weight.dtype
        residual = layer.weight.float() - (u * s) @ vh
        return LayerInit(trainable={"sigma": s.to(dtype)}, frozen={"svd_V": vh.to(dtype), "svd_U": u.to(dtype)},
                         rank=layer.rank, scale=1.0, base_weight=residual.to(dtype))

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        return emit_scaled_rows(gm, site, nodes["sigma"], nodes["svd_V"], nodes["svd_U"], scale)

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        return weight + (tensors["svd_U"] * tensors["sigma"]) @ tensors["svd_V"]

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        return merged - (tensors["svd_U"] * tensors["sigma"]) @ tensors["svd_V"]
