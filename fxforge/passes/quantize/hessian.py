"""The inverse-Hessian factor of GPTQ-style error feedback, shared by `quantize(method=gptq)`
and the calibrated BCQ of `shift_add`.

Quantizing column i of W (with the earlier columns already fixed) is best compensated by moving
the later columns along row i of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), scaled by
1/U_ii: eliminating columns in order takes successive Schur complements of H⁻¹, and the
Cholesky factor records all of them at once (GPTQ, arXiv 2210.17323, section 3 "Cholesky
reformulation"). H is damped first, H + λ·mean(diag H)·I, so a Hessian from fewer tokens than
features is still positive definite.

U is obtained from ONE Cholesky factorization: with P the reversal permutation, if
P·H·P = L·Lᵀ then H⁻¹ = (P·L⁻ᵀ·P)(P·L⁻¹·P) and P·L⁻¹·P is upper triangular with a positive
diagonal, hence the (unique) factor U. That replaces the textbook chol → cholesky_inverse →
chol (factorize, invert, factorize again) by one factorization and one triangular solve, and it
is accurate enough in float32: no H⁻¹ is formed, only L⁻¹, whose condition number is √cond(H).
(A blocked triangular inverse with fewer flops measured no faster through torch's solvers.)
"""
from __future__ import annotations

import torch
from torch import Tensor


def damped_hessian(hessian: Tensor, damp: float, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(H + λ·mean(diag H)·I in `dtype`, mask of dead input channels).

    Dead channels (H_jj = 0: no calibration input ever touched them) get a unit diagonal first;
    their weights cannot affect the output, and callers zero them.
    """
    h = hessian.detach().to(dtype).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    return h, dead


def inverse_hessian_factor(hessian: Tensor, damp: float = 0.01, *,
                           dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹ as float32, mask of dead channels).

    `dtype` is the precision of the factorization; float32 suffices for GPTQ (see the module
    docstring), float64 costs about twice as long.
    """
    h, dead = damped_hessian(hessian, damp, dtype)
    k, device = h.shape[0], h.device
    lower = torch.linalg.cholesky(h.flip(0, 1))
    del h  # K×K temporaries are dropped as soon as used: at K = 5632 each is 127 MiB in float32
    lower_inverse = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=dtype, device=device), upper=False)
    del lower
    return lower_inverse.flip(0, 1).to(torch.float32), dead
