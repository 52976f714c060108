"""`fxforge::rms_norm(x, weight, eps)`: y = x / sqrt(mean(x², -1) + eps) · weight.

Emitted by the `fuse_rms_norm` pass for the six-node spelling Llama-family models export
(pow, mean, add, rsqrt, mul, mul). The reference computes in float32 and casts back, as the
Hugging Face implementation does, so fusing is exact.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op


@define_op("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Reference: normalize the last dimension by its root mean square, then scale."""
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"fxforge::rms_norm: weight has {weight.shape[-1]} channels but x has {x.shape[-1]}"
        )
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def sample_inputs() -> list[SampleInput]:
    """Rows of a few widths (one not a power of two, which the kernel pads to its block)."""
    return [
        SampleInput("hidden=8 eps=1e-6", (torch.randn(2, 3, 8), torch.randn(8), 1e-6)),
        SampleInput("hidden=12 eps=1e-5 one row", (torch.randn(1, 12) * 5, torch.randn(12), 1e-5)),
    ]
