"""SORSA (Cao, 2024): train the principal singular triplets of W, kept orthonormal by a regularizer.

    W = U·S·Vᵀ;  A = V_rᵀ, S = σ_r, B = U_r (all trainable);  W_res = W - B·diag(S)·A
    y = x·W_resᵀ + b + (x·(diag(S)·A)ᵀ)·Bᵀ

diag(S)·A is composed in the graph in front of fxforge::lora_linear (scale 1). The
orthonormality regularizer ‖A·Aᵀ - I‖_F + ‖Bᵀ·B - I‖_F over every SORSA layer is
`sorsa_regularizer(compiled)`: add it to the loss (`fit(..., extra_loss=lambda:
γ·sorsa_regularizer(compiled))`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, get_attr
from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit, adapter_records
from fxforge.passes.adapters.svfit import emit_scaled_rows, singular_triplets
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Sorsa(AdapterMethod):
    name = "sorsa"
    changes_base_weight = True

    def scale(self, rank: int, alpha: float) -> float:
        return 1.0

    def init(self, layer: LayerContext) -> LayerInit:
        u, s, vh = singular_triplets(layer.weight, layer.rank)
        dtype = layer.weight.dtype
        residual = layer.weight.float() - (u * s) @ vh
        return LayerInit(trainable={"sorsa_A": vh.to(dtype), "sorsa_S": s.to(dtype), "sorsa_B": u.to(dtype)},
                         rank=layer.rank, scale=1.0, base_weight=residual.to(dtype))

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        return emit_scaled_rows(gm, site, nodes["sorsa_S"], nodes["sorsa_A"], nodes["sorsa_B"], scale)

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        return weight + (tensors["sorsa_B"] * tensors["sorsa_S"]) @ tensors["sorsa_A"]

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        return merged - (tensors["sorsa_B"] * tensors["sorsa_S"]) @ tensors["sorsa_A"]


def sorsa_regularizer(compiled: Any) -> Tensor:
    """Σ over SORSA layers of ‖A·Aᵀ - I‖_F + ‖Bᵀ·B - I‖_F (differentiable; 0 right after init)."""
    gm = getattr(compiled, "graph_module", compiled)
    total = torch.zeros(())
    for record in adapter_records(gm).values():
        if record["method"] != "sorsa":
            continue
        a, b = get_attr(gm, record["tensors"]["sorsa_A"]), get_attr(gm, record["tensors"]["sorsa_B"])
        eye = torch.eye(a.shape[0], dtype=a.dtype)
        total = total + torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye)
    return total
