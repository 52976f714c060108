"""GPTQ (arXiv 2210.17323): quantize a weight column by column, feeding each column's rounding
error back into the columns not yet quantized, weighted by the inverse Hessian H = XᵀX/n of the
layer's calibration inputs, so the layer *output* error stays small rather than the weight error.

Standard choices: 1% damping of the mean diagonal, dead inputs (H_jj = 0) zeroed, the upper
Cholesky factor of H⁻¹, lazy batch updates in blocks of `block_size` columns. Group parameters
(group_axis="in") are computed from the already-updated weights when a group starts; blocks are
aligned to whole groups so a group never straddles two blocks. With group_axis="out" (per-IC)
each column's parameters come from that column's groups of output rows when it is quantized.
Calibration inputs come from the float model (all layers at once, not layer by layer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec, qparams, quantize_codes


def inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, mask of dead input channels)."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32), dead


def quantize_weight_gptq(matrix: Tensor, spec: QuantSpec, hessian: Tensor, group_axis: str = "in", *,
                         damp: float = 0.01, block_size: int = 128) -> QuantizedMatrix:
    """GPTQ codes for `matrix` (W (N, K) for group_axis="in", Wᵀ (K, N) for "out"); hessian is (K, K)."""
    w = (matrix if group_axis == "in" else matrix.T).to(torch.float32).clone()
    n, k = w.shape
    g = spec.group_size
    hinv, dead = inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0.0
    codes = torch.zeros(n, k)
    per_row = group_axis == "in"
    scales = torch.zeros(n, k // g) if per_row else torch.zeros(k, n // g)
    zeros = torch.zeros_like(scales)
    step = (max(block_size // g, 1) * g) if per_row else block_size
    scale = zero = None
    for start in range(0, k, step):
        stop = min(start + step, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            column = block[:, i]
            if per_row:
                if col % g == 0:  # the group's range, from weights already corrected by earlier columns
                    scale, zero = qparams(block[:, i:i + g], spec)
                    scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
                q = quantize_codes(column[:, None], scale, zero, spec)[:, 0]
                dequant = (q - zero[:, 0]) * scale[:, 0]
            else:
                groups = column.reshape(n // g, g)
                scale, zero = qparams(groups, spec)
                q = quantize_codes(groups, scale, zero, spec).reshape(n)
                dequant = ((q.reshape(n // g, g) - zero) * scale).reshape(n)
                scales[col], zeros[col] = scale[:, 0], zero[:, 0]
            codes[:, col] = q
            err = (column - dequant) / hinv_block[i, i]
            block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    oriented = codes if per_row else codes.T
    return QuantizedMatrix(codes=oriented.contiguous().to(torch.uint8), scales=scales,
                           zeros=zeros.to(torch.uint8), group_size=g)
