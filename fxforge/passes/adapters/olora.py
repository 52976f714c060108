"""OLoRA (Büyükakyüz, 2024): orthonormal LoRA factors from a QR decomposition of W.

    W = Q·R,  B = Q[:, :r],  A = R[:r],  W_res = W - s·B·A

B starts orthonormal (which the paper finds speeds convergence) and the residual keeps the
initial output unchanged up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Olora(AdapterMethod):
    name = "olora"
    changes_base_weight = True

    def init(self, layer: LayerContext) -> LayerInit:
        r, scale = layer.rank, self.scale(layer.rank, layer.alpha)
        weight = layer.weight.float()
        q, upper = torch.linalg.qr(weight)
        b, a = q[:, :r].contiguous(), upper[:r].contiguous()
        dtype = layer.weight.dtype
        return LayerInit(trainable={"lora_A": a.to(dtype), "lora_B": b.to(dtype)}, rank=r, scale=scale,
                         base_weight=(weight - scale * (b @ a)).to(dtype))
