"""`fxforge::dora_linear(x, W, b, A, B, m, scale)`: weight-decomposed low-rank adaptation.

    V = W + scale·B·A;   y = (m / ‖V‖_row) ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b

with the row norm ‖V‖_row detached from the gradient, as the DoRA paper (Liu et al., 2024) and
Hugging Face PEFT do. m (out) is the trainable magnitude, A (r, in) and B (out, r) the
direction's LoRA factors. Emitted by `add_adapters(method="dora")`. Differentiable through a
recomputing backward (`recompute_autograd.py`): the norm makes a hand-written one error-prone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.lora_linear import check_lora_args
from fxforge.ir.ops.recompute_autograd import register_recompute_autograd
from fxforge.ir.ops.registry import SampleInput, define_op


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """‖W + scale·B·A‖ over each output row (out,)."""
    return torch.linalg.vector_norm(weight + scale * (lora_b @ lora_a), dim=1)


def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                 magnitude: Tensor, scale: float) -> Tensor:
    """The op's semantics in differentiable torch (used by the reference and the backward)."""
    norm = dora_weight_norm(weight, lora_a.detach(), lora_b.detach(), scale).detach()
    direction = F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b) * scale
    out = (magnitude / norm) * direction
    return out if bias is None else out + bias


@define_op("dora_linear")
def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                magnitude: Tensor, scale: float) -> Tensor:
    """Reference: rescale the LoRA-adapted rows to the trained magnitude."""
    check_lora_args(x, weight, bias, lora_a, lora_b)
    return dora_forward(x, weight, bias, lora_a, lora_b, magnitude, scale)


@dora_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
      magnitude: Tensor, scale: float) -> Tensor:
    check_lora_args(x, weight, bias, lora_a, lora_b)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"fxforge::dora_linear: magnitude must be ({weight.shape[0]},), got {tuple(magnitude.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_recompute_autograd(dora_linear, dora_forward)


def sample_inputs() -> list[SampleInput]:
    """With and without bias; the magnitude differs from the row norms so rescaling shows."""
    return [
        SampleInput("rank=4 bias", (torch.randn(2, 3, 16), torch.randn(12, 16), torch.randn(12),
                                    torch.randn(4, 16), torch.randn(12, 4), torch.rand(12) + 0.5, 0.5)),
        SampleInput("rank=2 no bias", (torch.randn(3, 8), torch.randn(8, 8), None,
                                       torch.randn(2, 8), torch.randn(8, 2), torch.rand(8) + 0.5, 2.0)),
    ]
