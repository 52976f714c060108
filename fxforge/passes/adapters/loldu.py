"""LoLDU (Shi et al., 2024): adapt through the diagonal of an LDU decomposition of W.

    P, L, U = lu(W);  D = diag(U)[:r];  L_r = L[:, :r];  U_r = U[:r] / D
    W_res = W - s·P·L_r·diag(D)·U_r;   y = x·W_resᵀ + b + s·(x·(diag(c·z)·U_r)ᵀ)·(P·L_r)ᵀ

Only the diagonal z (init D) and a scalar c (init 1) train; P·L_r and U_r are frozen, so
a layer trains r + 1 numbers. diag(c·z)·U_r is composed in the graph in front of
fxforge::lora_linear. At init the adapter reproduces what the residual removed: the output is
unchanged up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
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


@register_method("add_adapters")
@dataclass(frozen=True)
class Loldu(AdapterMethod):
    name = "loldu"
    changes_base_weight = True

    def init(self, layer: LayerContext) -> LayerInit:
        r, scale = layer.rank, self.scale(layer.rank, layer.alpha)
        weight = layer.weight.float()
        p, lower, upper = torch.linalg.lu(weight)
        diagonal = torch.diagonal(upper)[:r]
        if bool((diagonal.abs() < 1e-12).any()):
            raise PassError(f"add_adapters(method='loldu'): layer '{layer.site.module_path}' has a (near) zero "
                            f"pivot among its first {r} LU pivots (the weight is rank deficient); use a smaller "
                            f"rank or another method for this layer", pass_name="add_adapters")
        left = (p @ lower[:, :r]).contiguous()
        rows = (upper[:r] / diagonal[:, None]).contiguous()
        residual = weight - scale * (left * diagonal) @ rows
        dtype = layer.weight.dtype
        return LayerInit(trainable={"loldu_z": diagonal.to(dtype), "loldu_scale": torch.ones(1, dtype=dtype)},
                         frozen={"loldu_U": rows.to(dtype), "loldu_PL": left.to(dtype)},
                         rank=r, scale=scale, base_weight=residual.to(dtype))

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        x, w, b = base_args(site)
        diagonal = call_before(gm, site.node, aten.mul.Tensor, nodes["loldu_z"], nodes["loldu_scale"])
        column = call_before(gm, site.node, aten.unsqueeze.default, diagonal, -1)
        rows = call_before(gm, site.node, aten.mul.Tensor, column, nodes["loldu_U"])
        return torch.ops.fxforge.lora_linear.default, (x, w, b, rows, nodes["loldu_PL"], scale)

    def _delta(self, tensors: dict[str, Tensor], scale: float) -> Tensor:
        diagonal = tensors["loldu_z"] * tensors["loldu_scale"]
        return scale * (tensors["loldu_PL"] * diagonal) @ tensors["loldu_U"]

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        return weight + self._delta(tensors, scale)

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        return merged - self._delta(tensors, scale)
