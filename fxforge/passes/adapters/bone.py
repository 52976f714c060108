"""Bone / MiSS (Kang & Yin, 2024): block-structured updates instead of low-rank factors.

bone_form="miss" (the default, PEFT's MiSS): one trainable D (r, out), zero at init, shared by
    every r-wide input block: ΔW[o, j·r + k] = D[k, o]  ->  fxforge::miss_linear.
bone_form="bat" (Bone's block-affine form): one trainable B_i (r×r) per output block, zero at
    init: ΔW_ij = W_ij·B_i + B_i  ->  fxforge::bone_linear. r must divide both dimensions.

Both start exactly at the base model. Merge writes W + ΔW; unmerge inverts it (for "bat",
W = (W' - B_i)·(I + B_i)⁻¹ block by block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite
from fxforge.ir.ops.bone_linear import bone_weight
from fxforge.ir.ops.miss_linear import miss_delta_weight
from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit, base_args
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Bone(AdapterMethod):
    """bone_form: "miss" (MiSS, one D shared by the input blocks) or "bat" (block-affine)."""

    name = "bone"
    op_name = "miss_linear"
    recorded_options = ("bone_form",)
    bone_form: Literal["miss", "bat"] = "miss"

    def __post_init__(self) -> None:
        if self.bone_form not in ("miss", "bat"):
            raise ValueError(f"bone_form must be 'miss' or 'bat', got {self.bone_form!r}")

    def max_rank(self, in_features: int, out_features: int) -> int:
        return in_features

    def init(self, layer: LayerContext) -> LayerInit:
        r = layer.rank
        out_features, in_features = layer.weight.shape
        dtype = layer.weight.dtype
        if self.bone_form == "miss":
            return LayerInit(trainable={"miss_D": torch.zeros(r, out_features, dtype=dtype)}, rank=r, scale=1.0)
        if out_features % r or in_features % r:
            raise PassError(
                f"add_adapters(method='bone', bone_form='bat'): rank {r} must divide both dimensions of layer "
                f"'{layer.site.module_path}' ({out_features}x{in_features}); pick such a rank, exclude the layer, "
                f"or use bone_form='miss'", pass_name="add_adapters")
        return LayerInit(trainable={"bone_B": torch.zeros(out_features // r, r, r, dtype=dtype)}, rank=r, scale=1.0)

    def emit(self, gm: GraphModule, site: LinearSite, nodes: dict[str, Node], scale: float) -> tuple[Any, tuple]:
        x, w, b = base_args(site)
        if "miss_D" in nodes:
            return torch.ops.fxforge.miss_linear.default, (x, w, b, nodes["miss_D"])
        return torch.ops.fxforge.bone_linear.default, (x, w, b, nodes["bone_B"])

    def merged_weight(self, weight: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor:
        if "miss_D" in tensors:
            return weight + miss_delta_weight(tensors["miss_D"], weight.shape[1])
        return bone_weight(weight, tensors["bone_B"])

    def unmerged_weight(self, merged: Tensor, tensors: dict[str, Tensor], scale: float) -> Tensor | None:
        if "miss_D" in tensors:
            return merged - miss_delta_weight(tensors["miss_D"], merged.shape[1])
        blocks = tensors["bone_B"].double()
        r = blocks.shape[-1]
        out_features, in_features = merged.shape
        tiles = merged.double().reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)
        eye = torch.eye(r, dtype=torch.float64)
        base = (tiles - blocks) @ torch.linalg.inv(eye + blocks)
        return base.permute(1, 2, 0, 3).reshape(out_features, in_features).to(merged.dtype)
