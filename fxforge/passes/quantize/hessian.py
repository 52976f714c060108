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


def flip_in_place(matrix: Tensor, chunk: int = 1 << 20) -> Tensor:
    """`matrix.flip(0, 1)` written into `matrix` itself (contiguous); returns it.

    Reversing both axes of a contiguous matrix reverses its flat buffer, so the two ends are
    swapped `chunk` elements at a time: the only extra memory is one chunk, where `flip` would
    allocate a second K×K (484 MiB at a 7B model's K = 11008).
    """
    if not matrix.is_contiguous():
        raise ValueError("flip_in_place needs a contiguous matrix")
    flat = matrix.view(-1)
    n = flat.numel()
    for start in range(0, n // 2, chunk):
        size = min(chunk, n // 2 - start)
        head, tail = flat[start:start + size], flat[n - start - size:n - start]
        saved = head.flip(0)
        head.copy_(tail.flip(0))
        tail.copy_(saved)
    return matrix


def transpose_in_place(matrix: Tensor, tile: int = 512) -> Tensor:
    """`matrix.T` written into the square `matrix` itself, tile by tile (one tile of extra
    memory); returns it."""
    k = matrix.shape[0]
    for i in range(0, k, tile):
        i_end = min(i + tile, k)
        matrix[i:i_end, i:i_end] = matrix[i:i_end, i:i_end].T.clone()
        for j in range(i_end, k, tile):
            j_end = min(j + tile, k)
            saved = matrix[i:i_end, j:j_end].clone()
            matrix[i:i_end, j:j_end] = matrix[j:j_end, i:i_end].T
            matrix[j:j_end, i:i_end] = saved.T
    return matrix


def _reversed_cholesky_in_place(hessian: Tensor, damp: float, dtype: torch.dtype,
                                rows: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(buffer, L as a column-major view of it, dead mask): L·Lᵀ = P·(H + λ·mean(diag H)·I)·P for
    the reversal permutation P, factorized in ONE K×K buffer of `dtype` (see
    inverse_hessian_factor). Only L's lower triangle is written; the rest of the buffer keeps H."""
    h = hessian.detach().to(dtype, copy=True)
    if rows is not None:
        h.div_(max(rows, 1))
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    k, device = h.shape[0], h.device
    # LAPACK works on column-major matrices: the buffer is rearranged in place so that its
    # column-major view is the reversed H (P·H·P), the same matrix, element for element, that
    # torch.linalg.cholesky(h.flip(0, 1)) would copy out (H may be asymmetric in its last bit).
    lower = flip_in_place(transpose_in_place(h)).mT
    info = torch.empty((), dtype=torch.int32, device=device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))  # in place: L overwrites P·H·P
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            f"the damped Hessian ({k}×{k}) is not positive definite (leading minor {int(info)}): raise damp "
            f"(now {damp}) or give more calibration data")
    return h, lower, dead


def inverse_hessian_factor(hessian: Tensor, damp: float = 0.01, *, dtype: torch.dtype = torch.float32,
                           rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹ as float32, mask of dead channels).

    `dtype` is the precision of the factorization; float32 suffices for GPTQ (see the module
    docstring), float64 costs about twice as long. With `rows`, `hessian` is the Gram matrix
    XᵀX and H = XᵀX / rows is formed inside the function's own buffer (no K×K for H alone).

    Memory: besides the caller's matrix, at most two K×K buffers of `dtype` exist at once (the
    Cholesky factor, factorized in place, and the identity the triangular solve overwrites),
    and one when the function returns, at the same results bit for bit as the out-of-place
    chain it replaced (flip → cholesky → solve_triangular → flip: five K×K at the peak).
    """
    h, lower, dead = _reversed_cholesky_in_place(hessian, damp, dtype, rows)
    k, device = h.shape[0], h.device
    inverse = torch.eye(k, dtype=dtype, device=device).mT  # column-major, as the solver wants it
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # in place: L⁻¹ overwrites I
    del h, lower  # K×K temporaries are dropped as soon as used: at K = 11008 each is 484 MiB in float32
    # U = P·L⁻¹·P in row-major order: the buffer holds (L⁻¹)ᵀ row-major, so transpose, then reverse.
    return flip_in_place(transpose_in_place(inverse.mT)).to(torch.float32), dead


FACTOR_BLOCK = 256  # columns of V per step of `_upper_lower_factor_in_place`


def _upper_lower_factor_in_place(h: Tensor, damp: float) -> Tensor:
    """V upper triangular with V·Vᵀ = h (the damped Hessian), written over h's upper triangle
    (the strict lower triangle keeps h); returns h.

    V = P·L·P for L = chol(P·h·P), computed directly, FACTOR_BLOCK columns at a time from the
    last: each block of columns gets the contributions of the columns after it in one matrix
    product, its diagonal block one small Cholesky and the rows above it one product with that
    block's triangular inverse. Nearly all the flops are in the matrix products, which run at
    BLAS speed: LAPACK's Cholesky of the flipped matrix plus the flips took 0.91 s at K = 5632
    on one core, this about 0.55 s. Only
    the upper triangle of h is read, as the flipped form reads it.
    """
    k = h.shape[0]
    for stop in range(k, 0, -FACTOR_BLOCK):
        start = max(stop - FACTOR_BLOCK, 0)
        if stop < k:  # columns [stop, k) of V are done: take their part out of h[:stop, start:stop]
            h[:stop, start:stop].addmm_(h[:stop, stop:], h[start:stop, stop:].T, alpha=-1.0)
        diagonal = h[start:stop, start:stop]
        lower, info = torch.linalg.cholesky_ex(diagonal.flip(0, 1))
        if int(info) != 0:
            raise torch.linalg.LinAlgError(
                f"the damped Hessian ({k}×{k}) is not positive definite (leading minor {k - start - int(info) + 1} "
                f"from the end): raise damp (now {damp}) or give more calibration data")
        diagonal.copy_(lower.flip(0, 1))  # the upper factor of this block (its strict lower part is cleared later)
        if start > 0:  # rows above: V[:start, J] · V[J, J]ᵀ = h[:start, J], by the block's inverse and
            # a matrix product (a triangular solve on these strided rows took 0.21 s of the 0.7 s, this 0.08 s)
            inverse = torch.linalg.solve_triangular(diagonal.triu(), torch.eye(stop - start), upper=True)
            rows_above = h[:start, start:stop]
            rows_above.copy_(rows_above @ inverse.T)
    return h


def feedback_factor(hessian: Tensor, damp: float = 0.01, *, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(F, mask of dead channels): the error-feedback matrix of GPTQ from ONE Cholesky factorization
    and no inverse. F (K, K) float32 is upper triangular with a unit diagonal, F = V·diag(V)⁻¹,
    where V is the upper triangular factor with H_damped = V·Vᵀ (V = U⁻¹ for the U of
    `inverse_hessian_factor`).

    Why it serves: GPTQ's column-by-column updates with U (scaled errors e_i = (w_i − q_i)/U_ii,
    w_j −= e_i·U_ij) add up to W − Q = E·U, so E = (W − Q)·V, and the column j about to be
    quantized, w_j = q_j + e_j·U_jj with U_jj = 1/V_jj, equals W_j + Σ_{i<j} (W_i − q_i)·F_ij:
    the same arithmetic (and the same codes, to float rounding) with the *unscaled* errors of the
    original weights fed through F. That skips the triangular inverse (K³ flops against the
    Cholesky's K³/3: 2.1 s → 0.8 s at K = 5632 on one core), and one K×K buffer is the only one.
    """
    h = hessian.detach().to(torch.float32, copy=True)
    if rows is not None:
        h.div_(max(rows, 1))
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    v = _upper_lower_factor_in_place(h, damp).triu_()
    return v.div_(v.diagonal().clone()), dead
