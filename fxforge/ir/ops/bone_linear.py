"""`fxforge::bone_linear(x, W, b, B)`: Bone's block-affine update (Kang & Yin, 2024; PEFT "bat").

W is cut into r×r blocks W_ij (output block i, input block j); B (out/r, r, r) holds one
matrix per output block, and every block becomes W_ij + W_ij·B_i + B_i, so the update mixes
the weight with itself (an affine transform of each block). y = x·W'ᵀ + b. Needs r to divide
both dimensions. Emitted by `add_adapters(method="bone", bone_form="bat")`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.recompute_autograd import register_recompute_autograd
from fxforge.ir.ops.registry import SampleInput, define_op


def bone_weight(weight: Tensor, blocks: Tensor) -> Tensor:
    """W' = W + W_ij·B_i + B_i for every r×r block (i: output block, j: input block)."""
    r = blocks.shape[-1]
    out_features, in_features = weight.shape
    tiles = weight.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)  # (j, i, r, r)
    updated = tiles @ blocks + blocks
    return weight + updated.permute(1, 2, 0, 3).reshape(out_features, in_features)


def bone_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: Tensor) -> Tensor:
    return F.linear(x, bone_weight(weight, blocks), bias)


def _check(weight: Tensor, blocks: Tensor) -> None:
    r = blocks.shape[-1]
    out_features, in_features = weight.shape
    if blocks.dim() != 3 or blocks.shape[1] != r or out_features % r or in_features % r \
            or blocks.shape[0] != out_features // r:
        raise ValueError(f"fxforge::bone_linear: B must be (out/r, r, r) with r dividing both dimensions of W "
                         f"{tuple(weight.shape)}, got {tuple(blocks.shape)}")


@define_op("bone_linear")
def bone_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: Tensor) -> Tensor:
    """Reference: build the block-affine weight, then an ordinary linear."""
    _check(weight, blocks)
    return bone_forward(x, weight, bias, blocks)


@bone_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: Tensor) -> Tensor:
    _check(weight, blocks)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_recompute_autograd(bone_linear, bone_forward)


def sample_inputs() -> list[SampleInput]:
    """Block size 4 on a non-square weight (several blocks each way), with and without bias."""
    return [
        SampleInput("r=4 bias", (torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8),
                                 torch.randn(2, 4, 4) * 0.1)),
        SampleInput("r=2 no bias", (torch.randn(3, 4), torch.randn(6, 4), None, torch.randn(3, 2, 2) * 0.1)),
    ]
