"""PiSSA (Meng et al., 2024): adapt the principal singular directions, freeze the residual.

    W = U·S·Vᵀ,  S_r = S[:r] / s,  A = diag(√S_r)·V_rᵀ,  B = U_r·diag(√S_r),  W_res = W - s·B·A

Dividing S_r by s first makes s·B·A the rank-r principal part of W, so the initial output is
unchanged up to rounding and training starts along W's dominant directions. Exact SVD in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Pissa(AdapterMethod):
    name = "pissa"
    changes_base_weight = True

    def init(self, layer: LayerContext) -> LayerInit:
        r, scale = layer.rank, self.scale(layer.rank, layer.alpha)
        weight = layer.weight.float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        residual = weight - scale * (b @ a)
        dtype = layer.weight.dtype
        return LayerInit(trainable={"lora_A": a.to(dtype), "lora_B": b.to(dtype)}, rank=r, scale=scale,
                         base_weight=residual.to(dtype))
