"""DoRA (Liu et al., 2024): decompose each weight into magnitude and direction; LoRA adapts the
direction, a per-row magnitude m trains alongside.

    V = W + s·B·A,  y = (m / ‖V‖_row)·(x·Vᵀ) + b,  ‖V‖_row detached;  m₀ = ‖W‖_row, B₀ = 0

Emits `fxforge::dora_linear` (an op with a recomputing backward). Merge writes (m/‖V‖)·V;
it cannot be undone without the pre-merge norm, so `unmerge_adapters` skips DoRA layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite
from fxforge.passes.adapters.common import LayerContext, LayerInit, base_args
from fxforge.passes.adapters.lora import Lora
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Dora(Lora):
    name = "dora"
    op_name = "dora_linear"
    rounds_at_init = True
    adapts_quantized = False  # DoRA's norm reads the float base weight  # m/‖W‖ is 1 only up to rounding (visibly so in bf16)

    def init(self, layer: LayerContext) -> LayerInit:
        init = super().init(layer)
        init.trainable["magnitude"] = torch.linalg.vector_norm(layer.weight.float(), dim=1).to(layer.weight.dtype)
        return init

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        x, w, b = base_args(site)
        return torch.ops.fxforge.dora_linear.default, (x, w, b, nodes["lora_A"], nodes["lora_B"],
                                                        nodes["magnitude"], scale)

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        direction = weight + scale * (tensors["lora_B"] @ tensors["lora_A"])
        return (tensors["magnitude"] / torch.linalg.vector_norm(direction, dim=1))[:, None] * direction

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        return None  # ‖W + s·B·A‖ of the pre-merge W is gone
