"""`fxforge::linear_bitdelta`: a fine-tuned linear stored as base weight + 1-bit sign delta.

Emitted by the `bitdelta` pass (BitDelta, arXiv 2402.10193):

    y = x·W_baseᵀ + α·x·sign(Δ)ᵀ + b,   Δ = W_fine - W_base

    base    float (N, K)          the shared base model's weight (unchanged, swappable deltas)
    signs   uint8 (N, K//8)       bit k%8 of byte k//8 is 1 where Δ[n, k] > 0 (+1), else 0 (-1)
    alpha   float (1,)            one scale per matrix

The reference unpacks the signs and multiplies in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op


def pack_signs(delta: Tensor) -> Tensor:
    """uint8 (N, K//8): bit k%8 of byte k//8 set where delta > 0. K must be a multiple of 8."""
    n, k = delta.shape
    if k % 8:
        raise ValueError(f"pack_signs: K={k} is not a multiple of 8")
    bits = (delta > 0).to(torch.int32).reshape(n, k // 8, 8)
    return (bits << torch.arange(8, dtype=torch.int32, device=delta.device)).sum(-1).to(torch.uint8)


def unpack_signs(signs: Tensor, k: int) -> Tensor:
    """±1 float32 (N, k) from packed sign bits."""
    bits = (signs.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=signs.device)) & 1
    return bits.reshape(signs.shape[0], -1)[:, :k].to(torch.float32) * 2 - 1


def check_bitdelta_args(k: int, base: Tensor, signs: Tensor, alpha: Tensor, bias: Optional[Tensor]) -> None:
    """Raise a ValueError naming the problem if the tensors do not describe one (N, K) layer."""
    if base.dim() != 2 or base.shape[1] != k:
        raise ValueError(f"fxforge::linear_bitdelta: base must be (N, K={k}), got {tuple(base.shape)}")
    n = base.shape[0]
    if signs.dtype != torch.uint8 or tuple(signs.shape) != (n, k // 8) or k % 8:
        raise ValueError(f"fxforge::linear_bitdelta: signs must be uint8 ({n}, {k // 8}) with K a multiple of 8, got "
                         f"{signs.dtype} {tuple(signs.shape)}")
    if alpha.numel() != 1:
        raise ValueError(f"fxforge::linear_bitdelta: alpha must hold one scale, got shape {tuple(alpha.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fxforge::linear_bitdelta: bias has shape {tuple(bias.shape)}, expected ({n},)")


def bitdelta_weight(base: Tensor, signs: Tensor, alpha: Tensor) -> Tensor:
    """W_base + α·sign(Δ), float32 (differentiable in alpha: scale distillation uses it)."""
    return base.to(torch.float32) + alpha.to(torch.float32).reshape(()) * unpack_signs(signs, base.shape[1])


@define_op("linear_bitdelta")
def linear_bitdelta(x: Tensor, base: Tensor, signs: Tensor, alpha: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Reference: base weight plus the scaled sign matrix, multiplied in float32."""
    check_bitdelta_args(x.shape[-1], base, signs, alpha, bias)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), bitdelta_weight(base, signs, alpha), b).to(x.dtype)


@linear_bitdelta.register_fake
def _(x: Tensor, base: Tensor, signs: Tensor, alpha: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_bitdelta_args(x.shape[-1], base, signs, alpha, bias)
    return x.new_empty((*x.shape[:-1], base.shape[0]))


def sample_inputs() -> list[SampleInput]:
    """With and without bias, K of one and of several sign bytes."""
    def call(x: Tensor, n: int, bias: bool):
        k = x.shape[-1]
        return (x, torch.randn(n, k), pack_signs(torch.randn(n, k)), torch.rand(1) * 0.1,
                torch.randn(n) if bias else None)

    return [
        SampleInput("K=16 bias", call(torch.randn(2, 3, 16), 8, True)),
        SampleInput("K=8 no bias", call(torch.randn(3, 8), 4, False)),
    ]
