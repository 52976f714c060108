"""EasyQuant (arXiv 2403.02775), data-free: outliers kept in float, ranges optimized.

Per row of the oriented matrix M, weights farther than `sigma` standard deviations from the row
mean (≈0.3% at 3σ for Gaussian rows) are outliers. The rest is quantized group-wise with a range
(lo, hi) — or absmax when symmetric — that gradient descent (Adam, straight-through rounding)
tunes to minimize ‖Q(W_normal) - W_normal‖² per group; each group keeps the best range seen,
starting from the min/max of its normal weights, so it never does worse than RTN on them.
Outliers are stored exactly as a sparse correction S = W - Ŵ at their positions and added back
at run time by fxforge::linear_sparse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import add_attr, aten
from fxforge.ir.ops import get_op
from fxforge.passes.methods import register_method
from fxforge.passes.quantize.common import check_option
from fxforge.passes.quantize.method import FAMILY, QuantizedLayer, WeightQuantizer
from fxforge.passes.quantize.rtn import MIN_SCALE, QuantizedMatrix, QuantSpec, quantize_codes

LEARNING_RATE = 5e-3


@dataclass
class SparseOutliers:
    """COO entries (in the oriented matrix's coordinates) of the float corrections."""

    rows: Tensor
    cols: Tensor
    values: Tensor


def _round_ste(t: Tensor) -> Tensor:
    return (torch.round(t) - t).detach() + t


def _fake_quant(groups: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Tensor:
    if spec.sym:
        scale = (hi / ((1 << (spec.bits - 1)) - 1)).clamp(min=MIN_SCALE)
        zero = float(1 << (spec.bits - 1))
        q = torch.clamp(_round_ste(groups / scale) + zero, 1, spec.qmax)
    else:
        scale = ((hi - lo) / spec.qmax).clamp(min=MIN_SCALE)
        zero = torch.clamp(_round_ste(-lo / scale), 0, spec.qmax)
        q = torch.clamp(_round_ste(groups / scale) + zero, 0, spec.qmax)
    return (q - zero) * scale


def quantize_weight_easyquant(matrix: Tensor, spec: QuantSpec, *, sigma: float = 3.0,
                              steps: int = 100) -> tuple[QuantizedMatrix, SparseOutliers]:
    """Codes of the normal weights with optimized ranges, and the outliers as a sparse correction."""
    m = matrix.to(torch.float32)
    rows, cols = m.shape
    g = spec.group_size
    deviation = (m - m.mean(dim=1, keepdim=True)).abs()
    outlier = deviation > sigma * m.std(dim=1, keepdim=True)
    normal = m.masked_fill(outlier, 0.0).reshape(rows, cols // g, g)
    weight = (~outlier).reshape(rows, cols // g, g).float()
    if spec.sym:
        lo0 = hi0 = normal.abs().amax(-1, keepdim=True)
    else:
        lo0, hi0 = normal.amin(-1, keepdim=True), normal.amax(-1, keepdim=True)
    lo_factor = torch.ones_like(lo0, requires_grad=True)
    hi_factor = torch.ones_like(hi0, requires_grad=True)
    optimizer = torch.optim.Adam([lo_factor, hi_factor], lr=LEARNING_RATE)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    with torch.enable_grad():
        for _ in range(steps + 1):
            lo, hi = lo0 * lo_factor, hi0 * hi_factor
            err = ((_fake_quant(normal, lo, hi, spec) - normal).pow(2) * weight).sum(-1, keepdim=True)
            with torch.no_grad():
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
            optimizer.zero_grad()
            err.sum().backward()
            optimizer.step()
    qm = _quantize_with_range(m, best_lo, best_hi, spec)
    correction = m - qm.dequantize()
    r, c = outlier.nonzero(as_tuple=True)
    return qm, SparseOutliers(rows=r, cols=c, values=correction[r, c])


def _quantize_with_range(m: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> QuantizedMatrix:
    rows, cols = m.shape
    groups = m.reshape(rows, cols // spec.group_size, spec.group_size)
    if spec.sym:
        scale = (hi / ((1 << (spec.bits - 1)) - 1)).clamp(min=MIN_SCALE)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        scale = ((hi - lo) / spec.qmax).clamp(min=MIN_SCALE)
        zero = torch.clamp(-torch.round(lo / scale), 0, spec.qmax)
    codes = quantize_codes(groups, scale, zero, spec)
    return QuantizedMatrix(codes=codes.reshape(rows, cols).to(torch.uint8), scales=scale.squeeze(-1),
                           zeros=zero.squeeze(-1).to(torch.uint8), group_size=spec.group_size)


def emit_outliers(gm: GraphModule, quantized: Node, outliers: SparseOutliers, group_axis: str) -> None:
    """y = quantized(x) + linear_sparse(x, outliers), in the weight's (out, in) coordinates."""
    if outliers.values.numel() == 0:
        return
    out_rows, in_cols = (outliers.rows, outliers.cols) if group_axis == "in" else (outliers.cols, outliers.rows)
    base = quantized.args[1].target.rsplit(".", 1)[0]
    out_features = quantized.meta["val"].shape[-1]
    indices = add_attr(gm, f"{base}.outlier_indices", torch.stack([out_rows, in_cols]).to(torch.int64),
                       buffer=True, before=quantized)
    values = add_attr(gm, f"{base}.outlier_values", outliers.values.to(torch.float32), buffer=True,
                      before=quantized)
    with gm.graph.inserting_after(quantized):
        sparse = gm.graph.call_function(get_op("linear_sparse").overload,
                                        (quantized.args[0], indices, values, int(out_features)))
    with gm.graph.inserting_after(sparse):
        total = gm.graph.call_function(aten.add.Tensor, (quantized, sparse))
    for node in (sparse, total):
        node.meta["module_path"] = quantized.meta.get("module_path", "")
    quantized.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total and user is not sparse)


# --------------------------------------------------------------------------- the method


@register_method(FAMILY)
@dataclass(frozen=True)
class EasyQuant(WeightQuantizer):
    """quantize(method=easyquant), data-free.

    outlier_sigma: weights beyond this many std of their row stay float (a sparse add).
    range_steps: gradient steps of the range optimization (0: min/max of the normal weights).
    """

    name = "easyquant"
    outlier_sigma: float = 3.0
    range_steps: int = 100

    def __post_init__(self) -> None:
        check_option(self.outlier_sigma > 0, f"quantize: outlier_sigma={self.outlier_sigma} must be positive")
        check_option(isinstance(self.range_steps, int) and self.range_steps >= 0,
                     f"quantize: range_steps={self.range_steps!r} must be an integer >= 0")

    def quantize(self, matrix, spec, site, stats, group_axis) -> QuantizedLayer:
        qm, outliers = quantize_weight_easyquant(matrix, spec, sigma=self.outlier_sigma, steps=self.range_steps)
        return QuantizedLayer(qm, outliers)
