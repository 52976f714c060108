"""`fxforge::miss_linear(x, W, b, D)`: MiSS (Kang & Yin, 2024), a block-shared weight update.

    ΔW[o, j·r + k] = D[k, o]  for every input block j   (D is (r, out); x zero-padded to a multiple of r)
    y = x·Wᵀ + b + (Σ_j x_j)·D                          with x_j the j-th r-wide block of x

so the update costs one sum over blocks and an (r × out) matmul. Emitted by
`add_adapters(method="bone", bone_form="miss")`; differentiable through a recomputing backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.recompute_autograd import register_recompute_autograd
from fxforge.ir.ops.registry import SampleInput, define_op


def miss_delta_weight(block: Tensor, in_features: int) -> Tensor:
    """ΔW (out, in) of a MiSS block D (r, out): Dᵀ repeated along the input, cut to `in_features`."""
    r = block.shape[0]
    repeats = -(-in_features // r)
    return block.t().repeat(1, repeats)[:, :in_features]


def miss_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    """The op's semantics in differentiable torch (PEFT's order of operations)."""
    r = block.shape[0]
    pad = (r - x.shape[-1] % r) % r
    xp = F.pad(x, (0, pad)) if pad else x
    summed = xp.reshape(*xp.shape[:-1], xp.shape[-1] // r, r).sum(dim=-2)
    return F.linear(x, weight, bias) + summed @ block


@define_op("miss_linear")
def miss_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    """Reference: base linear plus the block-summed input times D."""
    if block.dim() != 2 or block.shape[1] != weight.shape[0]:
        raise ValueError(f"fxforge::miss_linear: D must be (r, {weight.shape[0]}), got {tuple(block.shape)}")
    return miss_forward(x, weight, bias, block)


@miss_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    if block.dim() != 2 or block.shape[1] != weight.shape[0]:
        raise ValueError(f"fxforge::miss_linear: D must be (r, {weight.shape[0]}), got {tuple(block.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_recompute_autograd(miss_linear, miss_forward)


def sample_inputs() -> list[SampleInput]:
    """r dividing K, and r not dividing K (x is zero-padded), with and without bias."""
    return [
        SampleInput("r=4 bias", (torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8), torch.randn(4, 8))),
        SampleInput("r=3 pads K=10", (torch.randn(3, 10), torch.randn(6, 10), None, torch.randn(3, 6))),
    ]
