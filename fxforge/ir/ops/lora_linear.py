"""`fxforge::lora_linear(x, W, b, A, B, scale)`: y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ.

Emitted by the `add_adapters` pass for every method whose update is low rank (LoRA, rsLoRA,
PiSSA, OLoRA, EVA, LoRA-GA and, with A or B computed in the graph from their trainable
factors, LoRA-SB, SVFit, SORSA and LoLDU). A is (r, in), B is (out, r).

The op is differentiable: its backward is registered with `register_autograd` and written out
(the low-rank path never materializes B·A), so a compiled graph trains with torch.optim.
Frozen inputs (the base weight and bias) get no gradient unless they require one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op


def check_lora_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor) -> None:
    """Raise a ValueError naming the mismatch if the factors do not fit the base weight."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"fxforge::lora_linear: x has {x.shape[-1]} features, W expects {in_features}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"fxforge::lora_linear: A must be (r, {in_features}), got {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, lora_a.shape[0]):
        raise ValueError(
            f"fxforge::lora_linear: B must be ({out_features}, {lora_a.shape[0]}) to match W and A, "
            f"got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"fxforge::lora_linear: bias must be ({out_features},), got {tuple(bias.shape)}")


@define_op("lora_linear")
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float) -> Tensor:
    """Reference: the base linear plus the scaled low-rank branch, in x's dtype (PEFT's order)."""
    check_lora_args(x, weight, bias, lora_a, lora_b)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


@lora_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    check_lora_args(x, weight, bias, lora_a, lora_b)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    scale = ctx.scale
    needs = ctx.needs_input_grad
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    g_b = g2 @ lora_b  # (N, r): the output gradient seen by the low-rank bottleneck
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if needs[0]:
        grad_x = (g2 @ weight + (g_b @ lora_a) * scale).reshape(x.shape)
    if needs[1]:
        grad_w = g2.t() @ x2
    if needs[2] and ctx.has_bias:
        grad_bias = g2.sum(0)
    if needs[3]:
        grad_a = (g_b.t() @ x2) * scale
    if needs[4]:
        grad_b = (g2.t() @ (x2 @ lora_a.t())) * scale
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)


def sample_inputs() -> list[SampleInput]:
    """Rank 1 and 4, with and without bias, a batch of sequences and a single token."""
    return [
        SampleInput("rank=4 bias", (torch.randn(2, 3, 16), torch.randn(12, 16), torch.randn(12),
                                    torch.randn(4, 16), torch.randn(12, 4), 0.5)),
        SampleInput("rank=1 no bias one token", (torch.randn(1, 16), torch.randn(8, 16), None,
                                                 torch.randn(1, 16), torch.randn(8, 1), 2.0)),
    ]
