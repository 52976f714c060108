"""`fxforge::linear_fp`: linear with floating-point-format weights (FP8 E4M3/E5M2, FP4 E2M1),
optionally FP8 dynamic activations (W8A8 / W4A8 floating point).

Emitted by the `quantize_fp` pass (ZeroQuant-FP, LLM-FP4). Storage:

    codes   uint8: fp8 -> (N, K) bit patterns of torch.float8_e4m3fn / float8_e5m2;
                   e2m1 -> (N, K//2) 4-bit codes packed two a byte, low nibble first
                   (bit 3 sign, bits 2-1 exponent, bit 0 mantissa: ±{0, .5, 1, 1.5, 2, 3, 4, 6})
    scales  float (N, K//group_size)                 ŵ[n, k] = value(code[n, k]) · scales[n, k//g]
    act_fmt "" (float activations) or "e4m3"/"e5m2": x is rounded per token to that format with
            the dynamic scale max|x_row| / format max before the product.

The reference decodes with torch's float8 dtypes / the E2M1 table and multiplies in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.linear_wq import pack_bits, unpack_bits
from fxforge.ir.ops.registry import SampleInput, define_op

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FORMAT_MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def check_format(fmt: str, allow_none: bool = False) -> None:
    valid = tuple(FORMAT_MAX) if not allow_none else ("",) + tuple(FP8_DTYPES)
    if fmt not in valid:
        raise ValueError(f"fxforge::linear_fp: format {fmt!r} is not one of {valid}")


def encode(values: Tensor, fmt: str) -> Tensor:
    """Round float values (already scaled into the format's range) to codes: uint8 (…, K)."""
    check_format(fmt)
    v = values.to(torch.float32).clamp(-FORMAT_MAX[fmt], FORMAT_MAX[fmt])
    if fmt in FP8_DTYPES:
        return v.to(FP8_DTYPES[fmt]).view(torch.uint8)
    # nearest E2M1 value; ties go to the lower index, i.e. the smaller magnitude
    return (v.unsqueeze(-1) - E2M1_VALUES.to(v.device)).abs().argmin(dim=-1).to(torch.uint8)


def decode(codes: Tensor, fmt: str) -> Tensor:
    """Codes (unpacked, one a byte) -> float32 values."""
    check_format(fmt)
    if fmt in FP8_DTYPES:
        return codes.view(FP8_DTYPES[fmt]).to(torch.float32)
    return E2M1_VALUES.to(codes.device)[codes.long()]


def round_activations(x: Tensor, fmt: str) -> Tensor:
    """Per-token dynamic FP8 rounding of x (float32 in, float32 out); zero rows stay zero."""
    scale = x.abs().amax(dim=-1, keepdim=True) / FORMAT_MAX[fmt]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (x / scale).clamp(-FORMAT_MAX[fmt], FORMAT_MAX[fmt]).to(FP8_DTYPES[fmt]).to(torch.float32) * scale


def dequantize_fp(codes: Tensor, scales: Tensor, fmt: str, group_size: int, k: int) -> Tensor:
    """The float32 weight (N, k) the stored codes and scales stand for."""
    raw = unpack_bits(codes, 4, k) if fmt == "e2m1" else codes
    if raw.shape[-1] != k or k % group_size or scales.shape[-1] != k // group_size:
        raise ValueError(f"fxforge::linear_fp: codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not "
                         f"describe K={k} inputs in groups of {group_size} for format {fmt}")
    return decode(raw, fmt) * scales.to(torch.float32).repeat_interleave(group_size, dim=1)


@define_op("linear_fp")
def linear_fp(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], fmt: str, group_size: int,
              act_fmt: str) -> Tensor:
    """Reference: decode, scale, (round activations), multiply in float32; return in x's dtype."""
    check_format(act_fmt, allow_none=True)
    weight = dequantize_fp(codes, scales, fmt, group_size, x.shape[-1])
    x32 = x.to(torch.float32)
    if act_fmt:
        x32 = round_activations(x32, act_fmt)
    return F.linear(x32, weight, None if bias is None else bias.to(torch.float32)).to(x.dtype)


@linear_fp.register_fake
def _(x: Tensor, codes: Tensor, scales: Tensor, bias: Optional[Tensor], fmt: str, group_size: int, act_fmt: str):
    check_format(fmt)
    check_format(act_fmt, allow_none=True)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def sample_inputs() -> list[SampleInput]:
    """Each weight format; float and FP8 activations; one and several groups; bias or not."""
    def call(x: Tensor, n: int, fmt: str, group_size: int, bias: bool, act_fmt: str):
        k = x.shape[-1]
        codes = encode(torch.randn(n, k) * FORMAT_MAX[fmt] / 3, fmt)
        if fmt == "e2m1":
            codes = pack_bits(codes, 4)
        scales = torch.rand(n, k // group_size) * 0.01 + 1e-3
        return (x, codes, scales, torch.randn(n) if bias else None, fmt, group_size, act_fmt)

    return [
        SampleInput("e4m3 groups=2 bias", call(torch.randn(2, 3, 32), 8, "e4m3", 16, True, "")),
        SampleInput("e5m2 one group e4m3 activations", call(torch.randn(3, 32), 8, "e5m2", 32, False, "e4m3")),
        SampleInput("e2m1 groups=2 e5m2 activations", call(torch.randn(2, 32), 8, "e2m1", 16, True, "e5m2")),
    ]
