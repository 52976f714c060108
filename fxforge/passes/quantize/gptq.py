"""GPTQ (arXiv 2210.17323): quantize a weight column by column, feeding each column's rounding
error back into the columns not yet quantized, weighted by the inverse Hessian H = XᵀX/n of the
layer's calibration inputs, so the layer *output* error stays small rather than the weight error.

Standard choices: 1% damping of the mean diagonal, dead inputs (H_jj = 0) zeroed, the upper
Cholesky factor U of H⁻¹ (hessian.py), lazy batch updates in blocks of `block_size` columns.
Group parameters (group_axis="in") are computed from the already-updated weights when a group
starts; a block never straddles a group start (blocks hold whole groups, or a group is cut into
blocks that begin where it begins), so the group's weights are up to date at that moment. With
group_axis="out" (per-IC) each column's parameters come from that column's groups of output
rows when it is quantized. Calibration inputs come from the float model (all layers at once).

Where the time goes, and how it is kept small (fp32 on CPU):
* The work is done on Wᵀ (K, N), so a column of W is a contiguous row: every per-column step
  (round, error, update) reads and writes contiguous memory.
* Inside a block, column i's error reaches the later columns of its *sub-block* (a few
  columns) by a rank-1 update and the rest of the block by one matrix product per sub-block;
  the columns after the block get all of the block's errors in ONE matrix product
  (GPTQ's "lazy batch" update). The per-column Python work is thus a handful of small
  single-threaded vector operations; everything O(N·K²) runs in BLAS.
* The factor U comes from one float32 Cholesky and one triangular solve (hessian.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxforge.passes.quantize.hessian import inverse_hessian_factor
from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec, qparams, quantize_codes

SUB_BLOCK = 16  # columns per rank-1 stretch inside a block; the rest of the block gets a matmul


def block_bounds(k: int, group_size: int, block_size: int, groups_along_columns: bool) -> list[tuple[int, int]]:
    """[start, stop) column ranges of the lazy-update blocks.

    With groups along the columns (group_axis="in") no block may contain a group start other
    than at its own start unless it holds that whole group: a group's parameters are taken when
    its first column is reached, from weights that must already carry every earlier column's
    error, and columns after the current block do not get the block's errors until it ends.
    """
    if not groups_along_columns:
        return [(s, min(s + block_size, k)) for s in range(0, k, block_size)]
    if group_size <= block_size:  # whole groups per block
        step = (block_size // group_size) * group_size
        return [(s, min(s + step, k)) for s in range(0, k, step)]
    return [(s, min(s + block_size, g0 + group_size))  # each group cut into blocks from its start
            for g0 in range(0, k, group_size) for s in range(g0, g0 + group_size, block_size)]


def quantize_weight_gptq(matrix: Tensor, spec: QuantSpec, hessian: Tensor, group_axis: str = "in", *,
                         damp: float = 0.01, block_size: int = 128) -> QuantizedMatrix:
    """GPTQ codes for `matrix` (W (N, K) for group_axis="in", Wᵀ (K, N) for "out"); hessian is (K, K)."""
    per_row = group_axis == "in"
    # wt is Wᵀ (K, N), a private float32 copy the algorithm updates in place.
    wt = (matrix.T if per_row else matrix).to(torch.float32).contiguous().clone()
    k, n = wt.shape
    g = spec.group_size
    upper, dead = inverse_hessian_factor(hessian, damp)
    wt[dead] = 0.0
    codes = torch.empty(k, n)
    scales = torch.zeros(k // g, n) if per_row else torch.zeros(k, n // g)  # per_row: transposed at the end
    zeros = torch.zeros_like(scales)
    errors = torch.empty(max(b - a for a, b in block_bounds(k, g, block_size, per_row)), n)
    diag = upper.diagonal().tolist()
    group: tuple[Tensor, Tensor] | None = None
    for start, stop in block_bounds(k, g, block_size, per_row):
        block_err = errors[: stop - start]
        for sub in range(start, stop, SUB_BLOCK):
            sub_stop = min(sub + SUB_BLOCK, stop)
            for col in range(sub, sub_stop):
                column = wt[col]
                if per_row:
                    if col % g == 0:  # the group's range, from weights already corrected by earlier columns
                        scale, zero = qparams(wt[col:col + g].T, spec)
                        group = scale[:, 0], zero[:, 0]
                        scales[col // g], zeros[col // g] = group
                    scale, zero = group
                    q = quantize_codes(column, scale, zero, spec)
                    dequant = (q - zero) * scale
                else:
                    chunks = column.reshape(n // g, g)
                    scale, zero = qparams(chunks, spec)
                    q = quantize_codes(chunks, scale, zero, spec)
                    dequant = ((q - zero) * scale).reshape(n)
                    q = q.reshape(n)
                    scales[col], zeros[col] = scale[:, 0], zero[:, 0]
                codes[col] = q
                err = block_err[col - start]
                torch.div(column - dequant, diag[col], out=err)
                if col + 1 < sub_stop:  # within the sub-block: a rank-1 update of a few rows
                    wt[col + 1:sub_stop].addr_(upper[col, col + 1:sub_stop], err, alpha=-1.0)
            if sub_stop < stop:  # the sub-block's errors reach the rest of the block
                wt[sub_stop:stop].addmm_(upper[sub:sub_stop, sub_stop:stop].T, block_err[sub - start:sub_stop - start],
                                         alpha=-1.0)
        if stop < k:  # the lazy batch update: the block's errors reach every later column at once
            wt[stop:].addmm_(upper[start:stop, stop:].T, block_err, alpha=-1.0)
    oriented = codes.T if per_row else codes
    return QuantizedMatrix(codes=oriented.contiguous().to(torch.uint8),
                           scales=(scales.T if per_row else scales).contiguous(),
                           zeros=(zeros.T if per_row else zeros).contiguous().to(torch.uint8), group_size=g)
