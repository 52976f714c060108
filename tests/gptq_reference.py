"""The per-column GPTQ of fxforge up to issue 15, kept verbatim as the oracle the fast
implementation (fxforge/passes/quantize/gptq.py) is measured against: tests check its
reconstruction error and codes against this one, and bench/gptq_speed.py times both.

Differences from the fast form: the inverse-Hessian factor is computed in float64 as
chol(cholesky_inverse(chol(H))), and each column's error is pushed through the rest of its
block with a full (rows × block) update on the (rows, cols) layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec, qparams, quantize_codes


def inverse_hessian_factor_reference(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, mask of dead input channels), in float64."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32), dead


def quantize_weight_gptq_reference(matrix: Tensor, spec: QuantSpec, hessian: Tensor, group_axis: str = "in", *,
                                   damp: float = 0.01, block_size: int = 128) -> QuantizedMatrix:
    """GPTQ codes for `matrix` (W (N, K) for group_axis="in", Wᵀ (K, N) for "out"); hessian is (K, K)."""
    w = (matrix if group_axis == "in" else matrix.T).to(torch.float32).clone()
    n, k = w.shape
    g = spec.group_size
    hinv, dead = inverse_hessian_factor_reference(hessian, damp)
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
