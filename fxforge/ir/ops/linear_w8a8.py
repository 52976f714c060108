"""`fxforge::linear_w8a8`: W8A8 dynamic quantized linear (int8 weights, 8-bit activations).

Emitted by the `quantize_dynamic` pass. The weight is int8 (N, K), symmetric per output
channel with float32 scales `wscale` (N,). Activations are quantized when the op runs, in one
of two ways (`act_scale`), each defined as ONNX Runtime's integer kernels compute it, so the
ONNX lowering is bit-identical to this reference (and the Triton kernels are too):

"tensor" (ORT `DynamicQuantizeLinear` + `com.microsoft::MatMulIntegerToFloat`, which is what
ORT's `DynamicQuantizeMatMul` runs): one asymmetric uint8 scale for the whole tensor:

    lo = min(min(x), 0),  hi = max(max(x), 0)
    s  = (hi - lo) / 255          (1 when hi == lo)
    zp = round(clamp(-(lo / s), 0, 255))
    q  = clamp(round(x / s) + zp, 0, 255)                   round half to even throughout
    y  = float(Σ_k (q - zp)·W8) * (s * wscale[n]) + bias     each float32 op rounded in turn

"token" (ORT `com.microsoft::MatMulIntegerToFloat` with a per-row A scale): one symmetric int8
scale per token:

    s_m = max|x_m| / 127          (1 for a zero row)
    q   = clamp(round(x / s_m), -127, 127)
    y   = (float(Σ_k q·W8) * wscale[n]) * s_m + bias         ORT's order: column scale first

Divisions are IEEE float32 divisions on every device: the reference divides by tensors, never
by a Python number, because on CUDA torch turns division by a CPU scalar into multiplication by
its reciprocal, which rounds differently (one ulp of s, then codes and outputs move).

The integer product is exact (float64 holds every int32 sum here exactly); x is quantized in
float32 and the result is cast back to x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op

INT8_MAX = 127
UINT8_MAX = 255
ACT_SCALES = ("tensor", "token")

def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of x (..., K): returns (x8 int8, s_x float32 (..., 1))."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=-1, keepdim=True) / x32.new_full((), INT8_MAX)  # a tensor: see the docstring
    # An all-zero row would divide by zero; any positive scale quantizes it to zeros.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x8 = torch.clamp(torch.round(x32 / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return x8, scale


def per_tensor_params(x32: Tensor) -> tuple[Tensor, Tensor]:
    """DynamicQuantizeLinear's (scale, zero point) of a non-empty float32 x: 0-d float32 tensors.

    Plain tensor ops on x's device, so the Triton launcher reuses them as they are.
    """
    lo = torch.clamp(x32.amin(), max=0.0)  # the range always includes 0
    hi = torch.clamp(x32.amax(), min=0.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / hi.new_full((), UINT8_MAX))  # not `/ 255`: docstring
    zero_point = torch.round(torch.clamp(-(lo / scale), 0, UINT8_MAX))
    return scale, zero_point


def quantize_per_tensor(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uint8 quantization of the whole x: (q uint8, scale, zero point), as ORT does."""
    x32 = x.to(torch.float32)
    scale, zero_point = per_tensor_params(x32)
    q = torch.clamp(torch.round(x32 / scale) + zero_point, 0, UINT8_MAX).to(torch.uint8)
    return q, scale, zero_point


def check_w8a8_args(k: int, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act_scale: str = "tensor") -> None:
    """Raise a ValueError naming the problem if the weight tensors do not fit x's K."""
    if act_scale not in ACT_SCALES:
        raise ValueError(f"fxforge::linear_w8a8: act_scale must be one of {ACT_SCALES}, got {act_scale!r}")
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


def _int_product(codes: Tensor, qweight: Tensor) -> Tensor:
    """Σ_k codes·W8 as float32, exact in float64 first (|sum| < 2^31), then rounded once."""
    return (codes.to(torch.float64) @ qweight.to(torch.float64).T).to(torch.int32).to(torch.float32)


@define_op("linear_w8a8")
def linear_w8a8(
    x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act_scale: str = "tensor"
) -> Tensor:
    """Reference: 8-bit activations (per tensor or per token), exact integer matmul, float32 rescale."""
    check_w8a8_args(x.shape[-1], qweight, wscale, bias, act_scale)
    w32 = wscale.to(torch.float32)
    if x.numel() == 0:
        y = x.new_zeros((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)
    elif act_scale == "tensor":
        q, scale, zero_point = quantize_per_tensor(x)
        y = _int_product(q.to(torch.float64) - zero_point.to(torch.float64), qweight) * (scale * w32)
    else:
        x8, scale = quantize_per_token(x)
        y = (_int_product(x8, qweight) * w32) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def unrounded(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act_scale: str = "tensor") -> Tensor:
    """The op with float activations, x·Ŵᵀ + b (Ŵ = W8·s_w): what an exact pass after
    quantize_dynamic is proved on (fxforge/ir/activation_rounding.py says why)."""
    weight = qweight.to(torch.float32) * wscale.to(torch.float32)[:, None]
    return F.linear(x.to(torch.float32), weight, None if bias is None else bias.to(torch.float32)).to(x.dtype)


@linear_w8a8.register_fake
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act_scale: str = "tensor") -> Tensor:
    check_w8a8_args(x.shape[-1], qweight, wscale, bias, act_scale)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def sample_inputs() -> list[SampleInput]:
    """Both activation scalings, with and without bias, including a row of zeros (scale 1)."""
    def call(x: Tensor, n: int, bias: bool, act_scale: str):
        k = x.shape[-1]
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return (x, qweight, torch.rand(n) * 0.01 + 1e-3, torch.randn(n) if bias else None, act_scale)

    zero_row = torch.randn(3, 16)
    zero_row[1] = 0
    return [
        SampleInput("per-tensor bias", call(torch.randn(2, 3, 16), 8, True, "tensor")),
        SampleInput("per-token zero row", call(zero_row, 8, False, "token")),
        SampleInput("per-tensor all positive", call(torch.rand(2, 16), 4, False, "tensor")),
    ]
