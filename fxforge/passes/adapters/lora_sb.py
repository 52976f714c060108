"""LoRA-SB (Ponkshe et al., 2024): LoRA-XS's frozen factors with an optimal first step.

    y = x·Wᵀ + b + s·(x·(R·A)ᵀ)·Bᵀ,   A (r, in) and B (out, r) frozen,  R (r×r) the only trainable tensor

A and B are the top singular vectors of an approximated first full fine-tuning update: the
averaged gradient G over calibration batches when a loss is available (as LoRA-GA computes it),
so ΔR = -η·s·Bᵀ·G·Aᵀ reproduces the best rank-r approximation of the full first step; without
calibration data, the SVD of W itself (LoRA-XS). R starts at 0, so the output is unchanged.
R·A is composed in the graph (aten.mm) in front of fxforge::lora_linear. Merge: W += s·B·R·A.
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
from fxforge.passes.adapters.lora_ga import averaged_gradients, check_ga_batches, default_loss
from fxforge.passes.methods import register_method

aten = torch.ops.aten


@register_method("add_adapters")
@dataclass(frozen=True)
class LoraSb(AdapterMethod):
    """ga_batches: calibration batches the gradient is averaged over (without calibration data
    or a loss, LoRA-XS's SVD of W is used instead)."""

    name = "lora_sb"
    adapts_quantized = True
    ga_batches: int = 4

    def __post_init__(self) -> None:
        check_ga_batches(self.ga_batches)

    def prepare(self, gm: GraphModule, sites: list[LinearSite], ctx: Any, rank: int) -> dict[str, Any]:
        if ctx.calibration is None or (ctx.extras.get("loss_fn") is None and default_loss(gm) is None):
            return {}  # no data: LoRA-XS's SVD of W
        return averaged_gradients(gm, sites, ctx, self.ga_batches, self.name)

    def init(self, layer: LayerContext) -> LayerInit:
        r = layer.rank
        source = -layer.data if layer.data is not None else layer.weight.float()
        u, _, vh = torch.linalg.svd(source, full_matrices=False)
        dtype = layer.weight.dtype
        return LayerInit(trainable={"lora_R": torch.zeros(r, r, dtype=dtype)},
                         frozen={"lora_A": vh[:r].contiguous().to(dtype), "lora_B": u[:, :r].contiguous().to(dtype)},
                         rank=r, scale=self.scale(r, layer.alpha))

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        x, w, b = base_args(site)
        mixed = call_before(gm, site.node, aten.mm.default, nodes["lora_R"], nodes["lora_A"])  # R·A
        return torch.ops.fxforge.lora_linear.default, (x, w, b, mixed, nodes["lora_B"], scale)

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        return weight + scale * (tensors["lora_B"] @ tensors["lora_R"] @ tensors["lora_A"])

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        return merged - scale * (tensors["lora_B"] @ tensors["lora_R"] @ tensors["lora_A"])
