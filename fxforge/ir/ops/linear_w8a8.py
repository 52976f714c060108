"""`fxforge::linear_w8a8`: W8A8 dynamic quantized linear (int8 weights and activations).

Emitted by the `quantize_dynamic` pass. The weight is int8 (N, K), symmetric per output
channel with float32 scales `wscale` (N,). Activations are quantized per token when the op
runs:

    s_x  = max|x_row| / 127            (a zero row gets s_x = 1, so it quantizes to zeros)
    x8   = clamp(round(x / s_x), -127, 127)       round half to even, like torch.round
    y    = (x8 @ qweightᵀ as int32) * s_x * wscale + bias, in x's dtype

The reference forms the integer product exactly (float64 holds every int32 sum exactly) and
applies the scales in float32, as the Triton kernel's epilogue does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxforge.ir.ops.registry import define_op

INT8_MAX = 127


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of x (..., K): returns (x8 int8, s_x float32 (..., 1))."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    # An all-zero row would divide by zero; any positive scale quantizes it to zeros.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x8 = torch.clamp(torch.round(x32 / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return x8, scale


def check_w8a8_args(k: int, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor]) -> None:
    """Raise a ValueError naming the problem if the weight tensors do not fit x's K."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(
            f"fxforge::linear_w8a8: qweight must be 2-D int8 (N, K), got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if qweight.shape[1] != k:
        raise ValueError(f"fxforge::linear_w8a8: qweight has K={qweight.shape[1]} but x has K={k}")
    n = qweight.shape[0]
    if tuple(wscale.shape) != (n,):
        raise ValueError(f"fxforge::linear_w8a8: wscale has shape {tuple(wscale.shape)}, expected ({n},)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fxforge::linear_w8a8: bias has shape {tuple(bias.shape)}, expected ({n},)")


@define_op("linear_w8a8")
def linear_w8a8(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Reference: per-token int8 quantization, exact integer matmul, float32 rescale."""
    check_w8a8_args(x.shape[-1], qweight, wscale, bias)
    x8, scale = quantize_per_token(x)
    acc = (x8.to(torch.float64) @ qweight.to(torch.float64).T).to(torch.int32)
    y = acc.to(torch.float32) * scale * wscale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@linear_w8a8.register_fake
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_w8a8_args(x.shape[-1], qweight, wscale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
