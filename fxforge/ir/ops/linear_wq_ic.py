"""`fxforge::linear_wq_ic`: weight-only integer linear with per-input-channel (IC) grouping.

Emitted by `quantize(group_axis="out")` (AdaDim, "Rethinking Channel Dimensions"): groups run
along the output dimension inside one input channel, so an activation-outlier input channel
gets scales of its own. fxforge::linear_wq groups along K (MatMulNBits' layout) and cannot hold
this grouping, hence a separate op. The transposed weight Wᵀ (K, N) is stored packed exactly
like linear_wq's weight, with N in the role of the packed axis:

    qweight  uint8 (K, N*bits//8)   codes of Wᵀ, low bits first (fxforge.ir.ops.linear_wq.pack_bits)
    scales   float (K, N//group_size)
    zeros    uint8 (K, N//group_size)
    ŵᵀ[k, n] = (q[k, n] - zeros[k, n//g]) * scales[k, n//g];   y = x @ ŵᵀ + bias

The reference dequantizes in float32 and multiplies (the emulated path defines the numerics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxforge.ir.dequantize_cache import dequantized
from fxforge.ir.ops.linear_wq import check_wq_args, dequantize_wq, pack_bits
from fxforge.ir.ops.registry import SampleInput, define_op


def out_features(scales: Tensor, group_size: int) -> int:
    """N, recovered from the scales' shape (K, N//group_size)."""
    return scales.shape[1] * group_size


def check_wq_ic_args(k: int, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                     bits: int, group_size: int) -> None:
    """Raise a ValueError naming the problem if the tensors do not describe a (K, N) transposed weight."""
    if qweight.dim() != 2 or qweight.shape[0] != k:
        raise ValueError(
            f"fxforge::linear_wq_ic: qweight must be (K, N*bits//8) with K={k} rows (the input features), "
            f"got shape {tuple(qweight.shape)}"
        )
    n = out_features(scales, group_size)
    # The packed-tensor checks are linear_wq's with the roles of N and K swapped.
    check_wq_args(n, qweight, scales, zeros, None, bits, group_size)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fxforge::linear_wq_ic: bias has shape {tuple(bias.shape)}, expected ({n},)")


@define_op("linear_wq_ic")
def linear_wq_ic(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int
) -> Tensor:
    """Reference: dequantize Wᵀ in float32, multiply, return in x's dtype."""
    check_wq_ic_args(x.shape[-1], qweight, scales, zeros, bias, bits, group_size)
    n = out_features(scales, group_size)
    weight_t = dequantized((qweight, scales, zeros), (bits, group_size, n),  # fxforge/ir/dequantize_cache.py
                           lambda: dequantize_wq(qweight, scales, zeros, bits, group_size, n))
    y = x.to(torch.float32) @ weight_t
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@linear_wq_ic.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int):
    check_wq_ic_args(x.shape[-1], qweight, scales, zeros, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], out_features(scales, group_size)))


def sample_inputs() -> list[SampleInput]:
    """Groups along the output dimension: several and one per input channel, 2/4/8 bits."""
    def call(x: Tensor, n: int, bits: int, group_size: int, bias: bool):
        k = x.shape[-1]
        codes = torch.randint(0, 1 << bits, (k, n), dtype=torch.uint8)
        zeros = torch.randint(0, 1 << bits, (k, n // group_size), dtype=torch.uint8)
        scales = torch.rand(k, n // group_size) * 0.1 + 0.01
        return (x, pack_bits(codes, bits), scales, zeros, torch.randn(n) if bias else None, bits, group_size)

    return [
        SampleInput("bits=4 groups=2 bias", call(torch.randn(2, 3, 16), 16, 4, 8, True)),
        SampleInput("bits=2 one group", call(torch.randn(3, 16), 8, 2, 8, False)),
        SampleInput("bits=8 groups=4", call(torch.randn(2, 8), 16, 8, 4, False)),
    ]
