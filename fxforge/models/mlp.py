"""A plain 3-layer MLP on (batch, 32) features: the smallest model in the zoo, for fast tests
of linear-layer passes (quantize, adapters, prune, shift-add) without attention in the way.

Module paths: fc1, norm1, fc2, norm2, fc3 (activations and dropout are parameter-free).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fxforge.models.base import ZooModel, seeded

IN_FEATURES = 32
HIDDEN = 64
OUT_FEATURES = 10


class MLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout, twice, then a Linear head."""

    def __init__(
        self,
        in_features: int = IN_FEATURES,
        hidden: int = HIDDEN,
        out_features: int = OUT_FEATURES,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, out_features)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.norm1(self.fc1(x))))
        x = self.dropout(self.act(self.norm2(self.fc2(x))))
        return self.fc3(x)


def build_mlp(seed: int) -> ZooModel:
    """The zoo's `mlp`: (batch, 32) -> (batch, 10); `seq` in make_inputs is ignored."""
    with seeded(seed):
        model = MLP().eval()

    def make_inputs(batch: int = 4, seq: int | None = None) -> tuple[tuple, dict]:
        if batch < 1:
            raise ValueError(f"mlp: batch must be >= 1, got {batch}")
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, IN_FEATURES, generator=generator),), {}

    args, kwargs = make_inputs()
    return ZooModel(
        name="mlp",
        model=model,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=({0: Dim("batch", min=1)},),
        description=f"3-layer MLP {IN_FEATURES}->{HIDDEN}->{HIDDEN}->{OUT_FEATURES} "
        f"with LayerNorm, GELU and dropout",
        make_inputs=make_inputs,
    )
