"""`fxforge::linear_int8_mixed`: LLM.int8() mixed-precision decomposition (bitsandbytes).

Emitted by the `llm_int8` pass. The weight is int8 (N, K), symmetric per output row with float32
scales `wscale` (N,). When the op runs, input columns holding any |x| ≥ threshold (over every
token of the call) are outliers:

    X_out = X on outlier columns, 0 elsewhere;   X_in = X - X_out
    Y = (X8_in · W8ᵀ as int32) · s_x · s_w  +  X_out · Ŵᵀ  +  b,   Ŵ = W8 · s_w
    s_x = max|X_in row| / 127 (per token; 1 for an all-zero row), X8 = round(X_in / s_x)

which is TECHNIQUES.md's (X8·W8ᵀ)·c_x·c_wᵀ/127² with c = absmax. The integer part is exact
(float64 holds every int32 sum), as in fxforge::linear_w8a8's reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.linear_w8a8 import check_w8a8_args, quantize_per_token
from fxforge.ir.ops.registry import SampleInput, define_op


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Bool (K,): columns of x (..., K) where any token has |x| ≥ threshold."""
    return (x.abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0)


@define_op("linear_int8_mixed")
def linear_int8_mixed(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """Reference: int8 product of the regular columns plus a float product of the outlier columns."""
    check_w8a8_args(x.shape[-1], qweight, wscale, bias)
    x32 = x.to(torch.float32)
    outliers = outlier_columns(x32, threshold)
    x_out = x32 * outliers
    x8, scale = quantize_per_token(x32 - x_out)
    acc = (x8.to(torch.float64) @ qweight.to(torch.float64).T).to(torch.int32)
    dequantized = qweight.to(torch.float32) * wscale.to(torch.float32)[:, None]
    y = acc.to(torch.float32) * scale * wscale.to(torch.float32) + F.linear(x_out, dequantized)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def unrounded(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """The op with float activations, x·Ŵᵀ + b (regular and outlier columns alike): what an exact
    pass after llm_int8 is proved on (fxforge/ir/activation_rounding.py says why)."""
    dequantized = qweight.to(torch.float32) * wscale.to(torch.float32)[:, None]
    return F.linear(x.to(torch.float32), dequantized, None if bias is None else bias.to(torch.float32)).to(x.dtype)


@linear_int8_mixed.register_fake
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    check_w8a8_args(x.shape[-1], qweight, wscale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def sample_inputs() -> list[SampleInput]:
    """Outlier columns present (some inputs above the threshold) and absent, with and without bias."""
    def call(x: Tensor, n: int, bias: bool, threshold: float):
        k = x.shape[-1]
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return (x, qweight, torch.rand(n) * 0.01 + 1e-3, torch.randn(n) if bias else None, threshold)

    outliers = torch.randn(2, 3, 16)
    outliers[0, 1, 5] = 9.0
    outliers[1, 2, 11] = -7.0
    return [
        SampleInput("two outlier columns bias", call(outliers, 8, True, 6.0)),
        SampleInput("no outliers", call(torch.randn(3, 16), 8, False, 6.0)),
    ]
