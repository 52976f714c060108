"""`fxforge::shift_add_linear`: a multiplication-free linear (ShiftAddLLM, arXiv 2406.05981).

Emitted by the `shift_add` pass in place of `aten.linear(x, W, b)`. The weight is stored as
`q` binary sign planes and, per group of `group_size` input columns of each output row, `q`
scales α that are signed sums of at most T powers of two, so that y = Σ_p α_p·(x·b_p) needs
only additions (x·b_p, b_p ∈ {-1,+1}) and shifts (α_p):

    packed  int32 (N, ceil(K/32), q)   the "lat" layout: bit j of word w of plane p is the sign
                                       of column 32·w + j (1 -> +1, 0 -> -1); bits past K are 0
    exps    int8  (N, K//group_size, q, T)   exponents e_t
    signs   int8  (N, K//group_size, q, T)   s_t ∈ {-1, 0, +1} (0: term unused)
    α[n, g, p] = Σ_t s_t · 2^e_t                      (exact in float32: see check_invariants)
    ŵ[n, k]    = Σ_p α[n, k // group_size, p] · b_p[n, k]
    y          = x @ ŵᵀ + bias, computed in float32, returned in x's dtype

The reference is the emulated path (unpack, rebuild ŵ, F.linear) and defines the numerics
every backend is tested against. `pack_signs`, `unpack_signs`, `round_to_apot`, `apot_value`
and `check_invariants` are public: the pass builds its buffers with them and tests prove the
stored form means what it says with integer arithmetic only.

What the backends trade away: the Triton lowering (kernels/shift_add_lut.py) keeps the packed
form and computes with table lookups and exponent adds. The ONNX lowering rebuilds ŵ from the
packed planes with standard ops (BitwiseAnd, Where, Pow, Mul, ReduceSum) followed by a float
MatMul; ONNX Runtime constant-folds that rebuild at session start (tested), so the .onnx file
stays small (1 bit per weight and plane) but at run time the weight lives in float32 and is
multiplied as usual:
memory and the multiplication-free arithmetic are given up for portability, not accuracy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fxforge.ir.ops.registry import SampleInput, define_op

MIN_EXP, MAX_EXP = -126, 127  # α terms stay float32 normals
MAX_EXP_SPAN = 23  # a sum of powers of two within 24 binary digits is exact in float32


# --------------------------------------------------------------------------- sign planes


def pack_signs(planes: Tensor) -> Tensor:
    """Pack ±1 sign planes (q, N, K) into int32 words (N, ceil(K/32), q), the "lat" layout.

    Column k of plane p goes to bit k % 32 of word k // 32; +1 is a set bit, -1 a clear one;
    bits past K are zero.

    >>> pack_signs(torch.tensor([[[1, -1, 1]]]))[0, 0, 0].item()
    5
    """
    if planes.dim() != 3:
        raise ValueError(f"pack_signs: expected planes of shape (q, N, K), got {tuple(planes.shape)}")
    if planes.numel() and not bool(((planes == 1) | (planes == -1)).all()):
        raise ValueError("pack_signs: sign planes must hold only -1 and +1")
    q, n, k = planes.shape
    words = -(-k // 32)
    bits = (planes > 0).to(torch.int64)
    bits = F.pad(bits, (0, words * 32 - k)).reshape(q, n, words, 32)
    shifts = torch.arange(32, dtype=torch.int64, device=planes.device)
    unsigned = (bits << shifts).sum(-1)
    # int32 storage: values >= 2^31 wrap to negative, exactly as the bit pattern is.
    signed = torch.where(unsigned >= 1 << 31, unsigned - (1 << 32), unsigned).to(torch.int32)
    return signed.permute(1, 2, 0).contiguous()


def unpack_bits(packed: Tensor, k: int) -> Tensor:
    """The raw sign bits of `packed` (N, W, q) as uint8 (q, N, W*32); columns >= k included."""
    _check_packed(packed, k)
    n, words, q = packed.shape
    shifts = torch.arange(32, dtype=torch.int64, device=packed.device)
    bits = (packed.to(torch.int64).permute(2, 0, 1).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(q, n, words * 32).to(torch.uint8)


def unpack_signs(packed: Tensor, k: int) -> Tensor:
    """Inverse of `pack_signs`: int32 (N, ceil(k/32), q) -> int8 ±1 planes (q, N, k)."""
    bits = unpack_bits(packed, k)[..., :k]
    return (bits.to(torch.int8) * 2 - 1).to(torch.int8)


def _check_packed(packed: Tensor, k: int) -> None:
    if packed.dtype != torch.int32 or packed.dim() != 3:
        raise ValueError(
            f"fxforge::shift_add_linear: packed signs must be int32 (N, ceil(K/32), q), got {packed.dtype} "
            f"{tuple(packed.shape)}; build them with fxforge.ir.ops.shift_add_linear.pack_signs"
        )
    if packed.shape[1] != -(-k // 32):
        raise ValueError(
            f"fxforge::shift_add_linear: K={k} input features need {-(-k // 32)} int32 words per row, "
            f"but packed has {packed.shape[1]}; the weight was packed for another input size"
        )


# --------------------------------------------------------------------------- power-of-two scales


def round_to_apot(alpha: Tensor, terms: int) -> tuple[Tensor, Tensor]:
    """Round each α to a signed sum of at most `terms` powers of two, greedily.

    Each step takes the power of two nearest to the remainder (in value, not in log) with the
    remainder's sign. Returns (exps, signs) as int8 tensors of shape alpha.shape + (terms,);
    unused terms have sign 0. Exponents below the largest one by more than MAX_EXP_SPAN are
    dropped so the float32 value of the sum is exact.

    >>> e, s = round_to_apot(torch.tensor([0.75]), 2)
    >>> apot_value(e, s)
    tensor([0.7500])
    """
    if terms < 1:
        raise ValueError(f"round_to_apot: terms must be >= 1, got {terms}")
    rest = alpha.detach().to(torch.float64)
    exps = torch.zeros(*alpha.shape, terms, dtype=torch.int8, device=alpha.device)
    signs = torch.zeros_like(exps)
    top = None
    for t in range(terms):
        mag = rest.abs()
        live = mag > 0
        lo = torch.floor(torch.log2(torch.where(live, mag, torch.ones_like(mag))))
        # 2^lo <= |r| < 2^(lo+1): the nearer of the two (ties to the larger).
        e = torch.where(mag - torch.exp2(lo) < torch.exp2(lo + 1) - mag, lo, lo + 1)
        if top is None:
            top = e.clamp(MIN_EXP, MAX_EXP)
        live &= (e >= MIN_EXP) & (e <= MAX_EXP) & (e >= top - MAX_EXP_SPAN)
        e = torch.where(live, e, torch.zeros_like(e))
        s = torch.where(live, torch.sign(rest), torch.zeros_like(rest))
        exps[..., t] = e.to(torch.int8)
        signs[..., t] = s.to(torch.int8)
        rest = rest - s * torch.exp2(e)
    return exps, signs


def apot_value(exps: Tensor, signs: Tensor) -> Tensor:
    """α = Σ_t s_t · 2^e_t in float32 (exact for terms that pass `check_invariants`)."""
    powers = torch.ldexp(torch.ones((), dtype=torch.float32, device=exps.device), exps.to(torch.float32))
    return (signs.to(torch.float32) * powers).sum(-1)


def dequantize_shift_add(packed: Tensor, exps: Tensor, signs: Tensor, group_size: int, k: int) -> Tensor:
    """The float32 weight ŵ (N, k) that the stored form stands for."""
    check_args(k, packed, exps, signs, None, group_size)
    planes = unpack_signs(packed, k).to(torch.float32)  # (q, N, K)
    alpha = apot_value(exps, signs).permute(2, 0, 1)  # (q, N, G)
    scale = alpha.repeat_interleave(group_size, dim=2)  # (q, N, K)
    return (scale * planes).sum(0)


# --------------------------------------------------------------------------- checks


def check_args(k: int, packed: Tensor, exps: Tensor, signs: Tensor, bias: Optional[Tensor], group_size: int) -> None:
    """Raise a ValueError naming the problem if the stored tensors do not fit together (shapes, dtypes)."""
    _check_packed(packed, k)
    if group_size <= 0 or group_size % 8 or k % group_size:
        raise ValueError(
            f"fxforge::shift_add_linear: group_size={group_size} must be a positive multiple of 8 that "
            f"divides K={k} (8 sign bits form one lookup-table byte); pick e.g. group_size=K"
        )
    n, _, q = packed.shape
    expected = (n, k // group_size, q)
    for name, t in (("exps", exps), ("signs", signs)):
        if t.dtype != torch.int8 or t.dim() != 4 or tuple(t.shape[:3]) != expected:
            raise ValueError(
                f"fxforge::shift_add_linear: {name} must be int8 (N, K//group_size, q, terms) = "
                f"({', '.join(map(str, expected))}, T), got {t.dtype} {tuple(t.shape)}"
            )
    if exps.shape != signs.shape:
        raise ValueError(f"fxforge::shift_add_linear: exps {tuple(exps.shape)} and signs {tuple(signs.shape)} differ")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fxforge::shift_add_linear: bias has shape {tuple(bias.shape)}, expected ({n},)")


def naf_weight(m: Tensor) -> Tensor:
    """Fewest signed powers of two summing to each non-negative integer in `m` (int64).

    The non-adjacent form of m has its digits where (3m XOR m) has set bits, so its weight is
    that popcount; no representation as a signed sum of powers of two is shorter.
    """
    x = (3 * m) ^ m
    count = torch.zeros_like(m)
    for _ in range(64):
        count += x & 1
        x = x >> 1
    return count


def check_invariants(packed: Tensor, exps: Tensor, signs: Tensor, group_size: int, k: int) -> None:
    """Prove with integer arithmetic only that the stored form is what the op claims.

    - every sign bit decodes to -1 or +1, and the padding bits past K are zero;
    - each term sign is -1, 0 or +1 and each used exponent is in [MIN_EXP, MAX_EXP] with the
      exponents of one α within MAX_EXP_SPAN of each other;
    - the float32 α that the reference multiplies by (`apot_value`) is read back through its IEEE
      bits: its value equals the integer Σ s_t·2^e_t exactly, and the non-adjacent-form weight of
      its mantissa is at most the number of terms used (so it *is* a sum of that many signed powers
      of two, whichever way it was computed).
    Raises ValueError naming the first violated property and where.
    """
    check_args(k, packed, exps, signs, None, group_size)
    decoded = unpack_bits(packed, k).to(torch.int32) * 2 - 1
    if not bool(((decoded == 1) | (decoded == -1)).all()):
        raise ValueError("shift_add_linear invariants: a sign bit decodes to something other than ±1")
    if bool(unpack_bits(packed, k)[..., k:].any()):
        raise ValueError(f"shift_add_linear invariants: bits past K={k} are set; padding must be zero")
    s = signs.to(torch.int64)
    e = exps.to(torch.int64)
    bad = ~((s == -1) | (s == 0) | (s == 1))
    if bool(bad.any()):
        raise ValueError(f"shift_add_linear invariants: term sign {int(s[bad][0])} is not -1, 0 or +1")
    used = s != 0
    if bool((used & ((e < MIN_EXP) | (e > MAX_EXP))).any()):
        raise ValueError(f"shift_add_linear invariants: an exponent lies outside [{MIN_EXP}, {MAX_EXP}]")
    e_hi = torch.where(used, e, torch.full_like(e, -(1 << 20))).amax(-1)
    e_lo = torch.where(used, e, torch.full_like(e, 1 << 20)).amin(-1)
    any_used = used.any(-1)
    if bool((any_used & (e_hi - e_lo > MAX_EXP_SPAN)).any()):
        raise ValueError(
            f"shift_add_linear invariants: the exponents of one scale span more than {MAX_EXP_SPAN} "
            f"binades, so float32 cannot hold their sum exactly"
        )
    # Integer value of each α in units of 2^e_lo: Σ s_t·2^(e_t - e_lo) (< 2^25 by the span check).
    base = torch.where(any_used, e_lo, torch.zeros_like(e_lo))
    shift = torch.where(used, e - base.unsqueeze(-1), torch.zeros_like(e))
    exact = (s << shift).sum(-1)
    # The float32 α's IEEE fields: sign, biased exponent E, mantissa m with its hidden bit.
    raw = apot_value(exps, signs).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = (raw >> 31) & 1
    biased = (raw >> 23) & 0xFF
    mantissa = (raw & 0x7FFFFF) | torch.where(biased > 0, 1 << 23, 0)
    unit = torch.where(biased > 0, biased, torch.ones_like(biased)) - 150  # value = m·2^unit
    value = torch.where(negative == 1, -mantissa, mantissa)
    d = unit - base
    if bool(((value != 0) & (d.abs() > 30)).any()):
        raise ValueError("shift_add_linear invariants: a float32 scale does not equal its power-of-two sum")
    dpos, dneg = d.clamp(0, 30), (-d).clamp(0, 30)
    if not bool(((value << dpos) == (exact << dneg)).all()):
        raise ValueError("shift_add_linear invariants: a float32 scale does not equal its power-of-two sum")
    if bool((naf_weight(mantissa) > used.sum(-1)).any()):
        raise ValueError("shift_add_linear invariants: a scale needs more powers of two than it has terms")


def stored_bits_per_weight(bits: int, group_size: int, terms: int) -> float:
    """Storage per weight: `bits` sign bits plus, per group, q·T (int8 exponent + int8 sign)."""
    return bits + bits * terms * 16 / group_size


# --------------------------------------------------------------------------- the op


@define_op("shift_add_linear")
def shift_add_linear(
    x: Tensor, packed: Tensor, exps: Tensor, signs: Tensor, bias: Optional[Tensor], group_size: int
) -> Tensor:
    """Reference: rebuild ŵ from sign planes and power-of-two scales, multiply in float32."""
    check_args(x.shape[-1], packed, exps, signs, bias, group_size)
    weight = dequantize_shift_add(packed, exps, signs, group_size, x.shape[-1])
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), weight, b).to(x.dtype)


@shift_add_linear.register_fake
def _(x: Tensor, packed: Tensor, exps: Tensor, signs: Tensor, bias: Optional[Tensor], group_size: int) -> Tensor:
    # Shape errors surface at trace time, not first at run time on some backend.
    check_args(x.shape[-1], packed, exps, signs, bias, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


__all__ = [
    "shift_add_linear", "pack_signs", "unpack_signs", "unpack_bits", "round_to_apot", "apot_value",
    "dequantize_shift_add", "check_args", "check_invariants", "naf_weight", "stored_bits_per_weight",
    "MIN_EXP", "MAX_EXP", "MAX_EXP_SPAN",
]


def sample_inputs() -> list[SampleInput]:
    """One and several planes and terms, K with padding bits in the last word, a zero α, bias or not."""
    def call(x: Tensor, n: int, planes: int, terms: int, group_size: int, bias: bool):
        k = x.shape[-1]
        signs_pm = (torch.randint(0, 2, (planes, n, k)) * 2 - 1).to(torch.int8)
        alpha = torch.randn(n, k // group_size, planes) * 0.1
        alpha[0, 0, 0] = 0.0  # every term unused
        exps, signs = round_to_apot(alpha, terms)
        return (x, pack_signs(signs_pm), exps, signs, torch.randn(n) if bias else None, group_size)

    return [
        SampleInput("K=48 q=2 T=2 groups=2 bias", call(torch.randn(2, 3, 48), 8, 2, 2, 24, True)),
        SampleInput("K=32 q=1 T=1 one group one token", call(torch.randn(1, 32), 8, 1, 1, 32, False)),
    ]
