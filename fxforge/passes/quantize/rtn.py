"""Integer weight quantizers shared by every `quantize` method, and the RTN baseline.

Every method works on a matrix M whose rows are quantized in groups of `g` consecutive
columns: M = W (out, in) for group_axis="in", M = Wᵀ (in, out) for group_axis="out" (per-IC
grouping). A quantized matrix is integer codes (rows, cols) in [0, 2^bits), float scales and
uint8 zero points (rows, cols // g), so ŵ = (q - z)·s. Symmetric quantization uses the fixed
zero point 2^(bits-1) so both variants share one storage format (fxforge::linear_wq's).

    asymmetric: s = (max-min)/(2^b-1) (≥1e-5), z = -round(min/s), q = clamp(round(w/s)+z, 0, 2^b-1)
    symmetric:  s = absmax/(2^(b-1)-1) (≥1e-5), z = 2^(b-1),       q = clamp(round(w/s)+z, 1, 2^b-1)

with max/min/absmax shrunk by a per-group clip factor where a method chooses one (AWQ's output
search, or rtn's data-free `mse_clip`, the default of method rtn).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fxforge.ir.scratch import scratch, scratch_buffers

MIN_SCALE = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized: code width, group length along the columns, symmetry."""

    bits: int
    group_size: int  # already resolved: a positive divisor of the column count
    sym: bool = False

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def container_bits(self) -> int:
        """The storage width fxforge::linear_wq packs these codes into (2, 4 or 8)."""
        return 2 if self.bits <= 2 else 4 if self.bits <= 4 else 8


@dataclass
class QuantizedMatrix:
    """Codes, scales and zero points of a grouped matrix; `dequantize()` gives ŵ."""

    codes: Tensor   # uint8 (rows, cols)
    scales: Tensor  # float32 (rows, cols // group_size)
    zeros: Tensor   # uint8 (rows, cols // group_size)
    group_size: int

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """ŵ (rows, cols) float32; `out`: a float32 tensor of that shape to write it into."""
        rows, cols = self.codes.shape
        # Per group by broadcasting, in place on the one float32 buffer the result needs: the same
        # (q - z)·s per element as with scales and zeros repeated to (rows, cols), without those two
        # and the difference as further (rows, cols) float32 temporaries (4 weights' worth at once:
        # for an LM head that was most of quantize's peak while verification built the claim).
        if out is None:
            dense = self.codes.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        else:
            dense = out.copy_(self.codes)
        grouped = dense.view(rows, cols // self.group_size, self.group_size)
        grouped.sub_(self.zeros.to(torch.float32).unsqueeze(-1)).mul_(self.scales.unsqueeze(-1))
        return dense


def qparams(w: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Scale and zero point (float32, shape (..., 1)) for each row of w (..., g).

    `clip` shrinks the range (max·clip, min·clip), as AWQ's clip search and EasyQuant do.
    """
    return qparams_of_range(group_range(w, spec), spec, clip)


def group_range(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """What `qparams` reads of each row of w (..., g): (absmax, None) if symmetric, else (max, min)."""
    w = w.to(torch.float32)
    if spec.sym:
        return w.abs().amax(dim=-1, keepdim=True), None
    return w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)


def qparams_of_range(extent: tuple[Tensor, Tensor | None], spec: QuantSpec,
                     clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """`qparams` from a `group_range`: a clip search reads each group's range once, not per factor."""
    hi, lo = extent
    if spec.sym:
        scale = ((hi * clip) / ((1 << (spec.bits - 1)) - 1)).clamp(min=MIN_SCALE)
        return scale, torch.full_like(scale, float(1 << (spec.bits - 1)))
    hi, lo = hi * clip, lo * clip
    scale = ((hi - lo) / spec.qmax).clamp(min=MIN_SCALE)
    zero = torch.clamp(-torch.round(lo / scale), 0, spec.qmax)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, out: Tensor | None = None) -> Tensor:
    """Integer codes (float32 holding integers) of w under (scale, zero), broadcast along the last
    dim; into `out` (float32, w's shape) when given."""
    low = 1.0 if spec.sym else 0.0  # symmetric codes stay within ±(2^(b-1)-1) around the zero point
    # in place on the quotient: one temporary the size of w, not three (same values)
    return torch.div(w.to(torch.float32), scale, out=out).round_().add_(zero).clamp_(low, spec.qmax)


def _float32_rows(m: Tensor, start: int, stop: int, g: int) -> Tensor:
    """Rows start:stop of m as float32 groups (rows, cols // g, g): a view of a float32 m, else
    converted into a scratch buffer (`fxforge.ir.scratch`: reused chunk after chunk)."""
    rows = m[start:stop]
    if rows.dtype == torch.float32:
        return rows.reshape(-1, m.shape[1] // g, g)
    return scratch("rtn.rows", tuple(rows.shape), torch.float32, rows.device).copy_(rows).view(-1, m.shape[1] // g, g)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize: the float weight the quantized layer will compute with."""
    return (quantize_codes(w, scale, zero, spec) - zero) * scale


def quantize_matrix(m: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> QuantizedMatrix:
    """Group-wise round-to-nearest of m (rows, cols); `clip` is a scalar or (rows, cols//g, 1) tensor.

    Rows are independent, so they are done CLIP_CHUNK_ELEMENTS weights at a time straight into
    the uint8 codes: the float32 codes of a whole LM head (4 bytes a weight, plus the float32
    copy of a 16-bit weight) were the largest temporary of the quantize pass.
    """
    rows, cols = m.shape
    g = spec.group_size
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=m.device)
    scales, zeros = [], []
    step = max(1, CLIP_CHUNK_ELEMENTS // max(1, cols))
    per_row_clip = isinstance(clip, Tensor) and clip.dim() > 0 and clip.shape[0] == rows
    # one chunk's float temporaries, reused chunk after chunk; no grad for a parameter (out=)
    with torch.no_grad(), scratch_buffers():
        for start in range(0, rows, step):
            groups = _float32_rows(m, start, start + step, g)
            scale, zero = qparams(groups, spec, clip[start:start + step] if per_row_clip else clip)
            work = scratch("rtn.codes", tuple(groups.shape), torch.float32, m.device)
            codes[start:start + step] = quantize_codes(groups, scale, zero, spec, out=work).reshape(-1, cols)
            scales.append(scale.squeeze(-1))
            zeros.append(zero.squeeze(-1).to(torch.uint8))
    if not scales:  # no rows
        scales, zeros = [torch.empty(0, cols // g)], [torch.empty(0, cols // g, dtype=torch.uint8)]
    return QuantizedMatrix(codes=codes, scales=torch.cat(scales), zeros=torch.cat(zeros), group_size=g)


def quantize_weight_rtn(m: Tensor, spec: QuantSpec, clip_search: bool = False) -> QuantizedMatrix:
    """The RTN baseline: each group's full range (or, with `clip_search`, the range of lowest
    weight error, `mse_clip`), rounded to nearest."""
    return quantize_matrix(m, spec, mse_clip(m, spec) if clip_search else 1.0)


# Range shrink factors tried per group, full range first. On Gaussian and Student-t(4) weights
# at 4 bits, g=64/128, a grid down to 0.75 chose 0.85-1 for 99.9% of the groups.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85)
# Weights searched (and rounded, `quantize_matrix`) at once: temporaries of ~16 MB each. Smaller
# chunks keep them in cache (1 MB ones took 1/1.45 the CPU time on one idle thread), but every
# torch op then pays a thread wake-up: with 2 threads on a loaded 2-core machine each op cost
# ~18 ms whatever its size and the quantize pass of a 2-layer TinyLlama-shaped model took 3.3x
# as long (165 s vs 50 s). The op count is what must stay low. Rows are independent: the result
# does not depend on it.
CLIP_CHUNK_ELEMENTS = 1 << 22


def mse_clip(m: Tensor, spec: QuantSpec) -> Tensor:
    """Per (row, group) the factor of CLIP_GRID whose range gives the lowest squared weight
    error, shape (rows, cols // g, 1) for `quantize_matrix` (which recomputes the codes with
    it, through the same `qparams`, so the search and the result cannot disagree).

    Why: a group's full range spends levels on its one or two largest weights; shrinking it
    clamps those and rounds all the others finer. On Gaussian and Student-t(4) weights at
    4 bits this lowers the relative weight error by 5-13% (g=64/128), so asymmetric g=64 lands
    at the error of symmetric g=32 (what ONNX Runtime's builders write) with fewer bytes.
    """
    with torch.no_grad(), scratch_buffers():  # no grad for a parameter; chunk buffers reused
        return _mse_clip(m.detach(), spec)


def _mse_clip(m: Tensor, spec: QuantSpec) -> Tensor:
    rows, cols = m.shape
    g = spec.group_size
    best_clip = torch.ones(rows, cols // g, 1)
    chunk = max(1, CLIP_CHUNK_ELEMENTS // cols)
    low = 1.0 if spec.sym else 0.0
    for start in range(0, rows, chunk):
        groups = _float32_rows(m, start, start + chunk, g)
        chunk_clip = best_clip[start:start + chunk]
        best_err = None
        # scratch buffers, reused chunk after chunk: the first write to fresh memory (a page
        # fault per 4 KiB) was a fifth of the search
        work = scratch("rtn.codes", tuple(groups.shape), torch.float32, m.device)
        extent = group_range(groups, spec)  # once per chunk: the same range for every factor
        for clip in CLIP_GRID:
            scale, zero = qparams_of_range(extent, spec, clip)
            # fake_quantize's arithmetic, in place on one buffer, bit for bit: codes and zero
            # points are small integers, so clamp(round(w/s) + z, low, qmax) - z is exactly
            # clamp(round(w/s), low - z, qmax - z), two passes fewer over the weights. The clamp
            # as maximum then minimum: torch's clamp with per-group tensor bounds is ~4x slower
            # than both together. Then w - ŵ in one addcmul and the group's L2 norm in one
            # reduction (it orders the factors as the squared error does): half the time of
            # clamp, mul, sub, square, sum
            torch.div(groups, scale, out=work).round_()
            torch.minimum(torch.maximum(work, low - zero, out=work), spec.qmax - zero, out=work)
            torch.addcmul(groups, work, scale, value=-1, out=work)
            err = torch.linalg.vector_norm(work, dim=-1, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            torch.minimum(err, best_err, out=best_err)
            chunk_clip.masked_fill_(better, clip)
    return best_clip


# --------------------------------------------------------------------------- the method

from fxforge.passes.methods import register_method  # noqa: E402  (below the helpers the method uses)
from fxforge.passes.quantize.method import FAMILY, QuantizedLayer, WeightQuantizer  # noqa: E402


@register_method(FAMILY)
@dataclass(frozen=True)
class Rtn(WeightQuantizer):
    """quantize(method=rtn): round to nearest; no data.

    clip_search (default True): each group's range is shrunk by the factor of lowest weight
    error (`mse_clip`); False: each group's full range (plain RTN).
    """

    name = "rtn"
    takes_low_precision = True  # mse_clip and quantize_matrix convert one chunk of rows at a time
    clip_search: bool = True

    def quantize(self, matrix, spec, site, stats, group_axis) -> QuantizedLayer:
        return QuantizedLayer(quantize_weight_rtn(matrix, spec, clip_search=self.clip_search))
