"""`fxforge::linear_wq`: weight-only integer quantized linear (int2/int4/int8 containers).

Emitted by the `quantize` pass (RTN, AWQ, GPTQ, ...) in place of `aten.linear(x, W, b)`.
The weight is stored packed, asymmetric, per group of `group_size` input channels:

    qweight  uint8 (N, K*bits//8)   element k of row n is in byte (k*bits)//8 at bit offset
                                   (k*bits)%8, low bits first (ONNX Runtime MatMulNBits'
                                   layout, so ONNX export needs no repacking)
    scales   float (N, K//group_size)
    zeros    uint8 (N, K//group_size), values in [0, 2^bits)
    ŵ[n, k] = (q[n, k] - zeros[n, k//group_size]) * scales[n, k//group_size]
    y = x @ ŵᵀ + bias, in x's dtype

`bits` is the container width (2, 4 or 8): 3-bit codes live in 4-bit containers, 5-7-bit
codes in 8-bit ones. `group_size == K` means one group per output channel.
The reference is the emulated path (unpack, dequantize in float32, F.linear in float32) and
defines the numerics every backend is tested against. `pack_bits`, `unpack_bits` and
`dequantize_wq` are public: the quantization passes build their buffers with them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.dequantize_cache import caching, dequantized
from fxforge.ir.scratch import scratch
from fxforge.ir.ops.registry import SampleInput, define_op, register_many

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"fxforge::linear_wq: bits={bits} is not a container width; use 2, 4 or 8 "
            f"(store 3-bit codes with bits=4 and 5..7-bit codes with bits=8)"
        )


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack integer codes q (uint8, (N, K), values < 2^bits) into uint8 (N, K*bits//8).

    Element k of a row goes to byte (k*bits)//8 at bit offset (k*bits)%8, low bits first.

    >>> pack_bits(torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8), 4)
    tensor([[33, 243]], dtype=torch.uint8)
    """
    _check_bits(bits)
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise ValueError(f"pack_bits: expected a 2-D uint8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    per_byte = 8 // bits
    n, k = q.shape
    if k % per_byte:
        raise ValueError(
            f"pack_bits: {k} columns cannot be packed {per_byte} per byte at bits={bits}; "
            f"pad K to a multiple of {per_byte}"
        )
    if q.numel() and int(q.max()) >= 1 << bits:
        raise ValueError(f"pack_bits: code {int(q.max())} does not fit in {bits} bits (max {(1 << bits) - 1})")
    if bits == 8:
        return q.clone()
    # OR-ed in uint8, one code position at a time: a code below 2^bits shifted to its offset stays
    # below 256, so nothing is lost, and the temporaries are one packed row's size (the int32/int64
    # form held ~12 bytes a code at once: 0.75 GiB for TinyLlama's LM head).
    packed = q[:, 0::per_byte].clone(memory_format=torch.contiguous_format)
    for j in range(1, per_byte):
        packed |= q[:, j::per_byte] << (j * bits)
    return packed


def unpack_bits(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 (N, k*bits//8) -> uint8 codes (N, k)."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            f"unpack_bits: expected a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    per_byte = 8 // bits
    if k % per_byte or packed.shape[1] != k * bits // 8:
        raise ValueError(
            f"unpack_bits: a row of {k} {bits}-bit codes takes {k * bits / 8:g} bytes, but the packed "
            f"tensor has {packed.shape[1]} columns; check bits and K"
        )
    if bits == 8:
        return packed.clone()
    codes = torch.empty(packed.shape[0], k, dtype=torch.uint8, device=packed.device)
    _unpack_into(packed, bits, codes)
    return codes


def _unpack_into(packed: Tensor, bits: int, out: Tensor) -> None:
    """Write the codes of `packed` (N, k*bits//8) into `out` (N, k), uint8.

    One code position per op, shifted by a Python int (uint8, right shifts only, nothing is
    lost): a scalar shift is a vectorized kernel, 3x faster than one broadcast tensor of shifts.
    Each op writes its strided slots directly (`out=`): a temporary per position and a copy
    into the slots made unpacking 1.5x slower. This runs on every eager call of the op
    (verification runs it several times per pass).
    """
    per_byte, mask = 8 // bits, (1 << bits) - 1
    slots = out.view(packed.shape[0], packed.shape[1], per_byte)
    for j in range(per_byte):
        if j == 0:
            torch.bitwise_and(packed, mask, out=slots[..., 0])
        else:
            torch.bitwise_right_shift(packed, j * bits, out=slots[..., j])
            if j < per_byte - 1:
                slots[..., j].bitwise_and_(mask)


def check_wq_args(
    k: int, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int
) -> None:
    """Raise a ValueError naming the problem if the packed-weight tensors do not fit together."""
    _check_bits(bits)
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"fxforge::linear_wq: K={k} is not divisible by group_size={group_size}; pick a group size "
            f"that divides K (group_size=K gives one group per output channel)"
        )
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(
            f"fxforge::linear_wq: qweight must be 2-D uint8 (N, K*bits//8), got {qweight.dtype} "
            f"{tuple(qweight.shape)}; build it with fxforge.ir.ops.linear_wq.pack_bits"
        )
    if qweight.shape[1] * 8 != k * bits:
        raise ValueError(
            f"fxforge::linear_wq: qweight has {qweight.shape[1]} bytes per row, but K={k} codes of "
            f"bits={bits} need {k * bits / 8:g}; the bits argument does not match how the weight was packed"
        )
    n, groups = qweight.shape[0], k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"fxforge::linear_wq: {name} has shape {tuple(t.shape)}, expected (N, K//group_size) = "
                f"({n}, {groups})"
            )
    if zeros.dtype != torch.uint8:
        raise ValueError(f"fxforge::linear_wq: zeros must be uint8, got {zeros.dtype}")
    if not scales.is_floating_point():
        raise ValueError(f"fxforge::linear_wq: scales must be floating point, got {scales.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fxforge::linear_wq: bias has shape {tuple(bias.shape)}, expected ({n},)")


def dequantize_wq(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, k: int,
                  out: Optional[Tensor] = None) -> Tensor:
    """The float32 weight (N, k) that a packed linear_wq weight stands for.

    out: a float32 (N, k) tensor to write it into (an `fxforge.ir.scratch` buffer); default new.
    """
    check_wq_args(k, qweight, scales, zeros, None, bits, group_size)
    n, groups = qweight.shape[0], k // group_size
    # Per group by broadcasting (the same (code - zero) * scale per element as with scales and
    # zeros repeated to (N, K)), in place on the one float32 buffer the result needs:
    # `(codes - zero) * scale` held three N x K float32 tensors at once (for an LM head, most of
    # an eager int4 run's peak).
    # unpacked contiguous in uint8 (`_unpack_into`), then converted into the float32 buffer: writing
    # the codes through strided float32 views instead was slower. Most of what remains is the
    # first touch of fresh buffers: verification's runs hand in reused ones (fxforge/ir/scratch.py).
    weight = torch.empty(n, k, dtype=torch.float32, device=qweight.device) if out is None else out
    if bits == 8:
        weight.copy_(qweight)
    else:
        codes = scratch("linear_wq.codes", (n, k), torch.uint8, qweight.device)
        _unpack_into(qweight, bits, codes)
        weight.copy_(codes)
    grouped = weight.view(n, groups, group_size)
    grouped.sub_(zeros.to(torch.float32).unsqueeze(-1)).mul_(scales.to(torch.float32).unsqueeze(-1))
    return weight


# The dense float32 weight built at once by the reference: a larger layer (an LM head) is
# dequantized and multiplied this many bytes of rows at a time, so running it costs a slice of
# the weight, not a whole float32 copy (TinyLlama's head: 250 MiB). Quantize's claim
# (passes/quantize, ClaimedLinear) uses the same `row_chunks`, so both compute the same products.
DENSE_CHUNK_BYTES = 64 << 20


def row_chunks(rows: int, k: int) -> list[tuple[int, int]]:
    """(start, stop) slices of output rows whose float32 (rows, k) weight is ≤ DENSE_CHUNK_BYTES."""
    step = max(1, DENSE_CHUNK_BYTES // (4 * max(1, k)))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]


def chunked_linear_many(xs: list[Tensor], bias: Optional[Tensor], rows: int, k: int,
                        weight_rows: Callable[[int, int], Tensor]) -> list[Tensor]:
    """[F.linear(x, W, bias) for x in xs] with W built by `weight_rows(start, stop)` one `row_chunks`
    slice at a time, each slice once for every x (`fxforge.ir.lockstep`: verification's shapes)."""
    chunks = row_chunks(rows, k)
    parts: list[list[Tensor]] = [[] for _ in xs]
    for start, stop in chunks:
        weight = weight_rows(start, stop)
        b = bias if bias is None or len(chunks) == 1 else bias[start:stop]
        for part, x in zip(parts, xs):
            part.append(F.linear(x, weight, b))
        del weight
    return [p[0] if len(p) == 1 else torch.cat(p, dim=-1) for p in parts]


@register_many("linear_wq")  # verification's two shapes share one dequantization (fxforge/ir/lockstep.py)
def _linear_wq_many(xs: list[Tensor], qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                    bits: int, group_size: int) -> list[Tensor]:
    """linear_wq of each x with one dequantization of the weight for all of them."""
    k = xs[0].shape[-1]
    for x in xs:
        check_wq_args(x.shape[-1], qweight, scales, zeros, bias, bits, group_size)
    b = None if bias is None else bias.to(torch.float32)
    rows = qweight.shape[0]
    whole = len(row_chunks(rows, k)) == 1

    def weight_rows(start: int, stop: int) -> Tensor:
        # inside verification each weight (or slice of a large one: an LM head) is dequantized once,
        # not per call (fxforge/ir/dequantize_cache.py); kept entries must be buffers of their own
        tensors = (qweight, scales, zeros)
        key = (bits, group_size, k) if whole else (bits, group_size, k, start, stop)
        keep = caching(tensors)

        def compute() -> Tensor:
            out = None if keep else scratch("linear_wq.weight", (stop - start, k), torch.float32, qweight.device)
            if whole:
                return dequantize_wq(qweight, scales, zeros, bits, group_size, k, out=out)
            return dequantize_wq(qweight[start:stop], scales[start:stop], zeros[start:stop], bits, group_size, k,
                                 out=out)

        return dequantized(tensors, key, compute)

    outs = chunked_linear_many([x.to(torch.float32) for x in xs], b, rows, k, weight_rows)
    return [out.to(x.dtype) for out, x in zip(outs, xs)]


@define_op("linear_wq")
def linear_wq(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int
) -> Tensor:
    """Reference: unpack, dequantize and multiply in float32, return in x's dtype. A layer too
    large to hold dense (an LM head) is dequantized and multiplied a slice of rows at a time, so a
    call holds one slice's float32 copy, not the whole weight."""
    return _linear_wq_many([x], qweight, scales, zeros, bias, bits, group_size)[0]



@linear_wq.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor], bits: int, group_size: int):
    # Shape errors surface at trace time, not first at run time on some backend.
    check_wq_args(x.shape[-1], qweight, scales, zeros, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def sample_inputs() -> list[SampleInput]:
    """Every container width, 3-bit codes in a 4-bit container, one and several groups per row,
    with and without bias, a batch of tokens and a single token (the kernels' GEMV path)."""

    def call(x: Tensor, n: int, bits: int, group_size: int, bias: bool, code_bits: int | None = None):
        k = x.shape[-1]
        codes = torch.randint(0, 1 << (code_bits or bits), (n, k), dtype=torch.uint8)
        zeros = torch.randint(0, 1 << (code_bits or bits), (n, k // group_size), dtype=torch.uint8)
        scales = torch.rand(n, k // group_size) * 0.1 + 0.01
        return (x, pack_bits(codes, bits), scales, zeros, torch.randn(n) if bias else None, bits, group_size)

    return [
        SampleInput("bits=4 groups=2 bias", call(torch.randn(2, 3, 32), 8, 4, 16, True)),
        SampleInput("3-bit codes in bits=4, one group", call(torch.randn(3, 32), 8, 4, 32, False, code_bits=3)),
        SampleInput("bits=2 groups=2", call(torch.randn(2, 64), 8, 2, 32, False)),
        SampleInput("bits=8 groups=2 bias one token", call(torch.randn(1, 32), 8, 8, 16, True)),
    ]
