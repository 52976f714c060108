"""LoRA (Hu et al., 2021) and rsLoRA (Kalajdzievski, 2023): y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ.

A is kaiming-uniform(a=√5) as nn.Linear initializes it (PEFT's default), B = 0, so the initial
output is exactly the base model's. s = α/r for LoRA and α/√r for rsLoRA, whose rank-stable
scaling keeps the update's magnitude from shrinking as r grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit, kaiming_uniform
from fxforge.passes.methods import register_method


@register_method("add_adapters")
@dataclass(frozen=True)
class Lora(AdapterMethod):
    name = "lora"
    adapts_quantized = True

    def init(self, layer: LayerContext) -> LayerInit:
        out_features, in_features = layer.weight.shape
        a = kaiming_uniform(layer.rank, in_features, layer.generator, layer.weight.dtype)
        b = torch.zeros(out_features, layer.rank, dtype=layer.weight.dtype)
        return LayerInit(trainable={"lora_A": a, "lora_B": b}, rank=layer.rank,
                         scale=self.scale(layer.rank, layer.alpha))


@register_method("add_adapters")
@dataclass(frozen=True)
class RsLora(Lora):
    name = "rslora"

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank)
