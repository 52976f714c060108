"""The mask math of `sparsify`: which weights stay, unstructured or N:M, and DSnoT's refinement.

Pure tensor functions (no graph): `parse_pattern` reads the pattern option, `mask_unstructured`
and `mask_n_m` turn scores into keep-masks, `dsnot_refine` improves a mask without training.
The methods in `sparsify_methods.py` combine them.
"""
from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4). Raises ValueError otherwise."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"sparsify: pattern must be 'unstructured' or 'N:M' with 0 < N < M "
                         f"(e.g. '2:4'), got {pattern!r}")
    return int(match[1]), int(match[2])


def mask_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask removing the `sparsity` fraction of lowest scores (per row or per layer)."""
    if per_row:
        k = int(scores.shape[1] * sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            drop = torch.topk(scores, k, dim=1, largest=False).indices
            mask.scatter_(1, drop, False)
        return mask
    k = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return mask.view_as(scores)


def mask_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n highest scores of every m consecutive inputs of each row."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows, cols // m, m)
    keep = torch.topk(blocks, n, dim=2).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(rows, cols)


def dsnot_refine(weight: torch.Tensor, mask: torch.Tensor, second_moment: torch.Tensor, cycles: int,
                 block: int | None = None) -> torch.Tensor:
    """DSnoT: per row, swap one pruned weight in and one kept weight out while the error shrinks.

    The error is the layer's output reconstruction error per row, measured exactly over the
    calibration inputs: e = rᵀ C r with r the row's pruned weights and C = E[x xᵀ]. DSnoT
    (arXiv 2310.08915) steers by the error's mean ε = Σ_pruned W_ij·E[x_j] and a per-channel
    variance term; that proxy ignores correlations between channels, and on code-lm it made
    perplexity worse than Wanda's mask it started from (34.0 vs 32.1 at 60%). The exact error
    costs one (in × in) matrix per layer and keeps the swaps monotone in what matters.

    Each cycle, every row that still improves takes its best swap: grow the pruned weight whose
    return lowers e most, then prune the kept weight (same M-block for N:M) whose removal raises
    it least, if the pair lowers e. With g = C r per row, growing j changes e by
    -2·W_ij·g_j + W_ij²·C_jj, then pruning k by +2·W_ik·g'_k + W_ik²·C_kk (g' = g - W_ij·C_j).
    The number of kept weights per row (and per block) never changes.
    """
    mask = mask.clone()
    w = weight.double()
    c = second_moment.double()
    diag = c.diagonal()[None, :]
    rows = torch.arange(weight.shape[0])
    cols = torch.arange(weight.shape[1])
    g = (w * ~mask) @ c  # C r for every row (C is symmetric)
    active = torch.ones(weight.shape[0], dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    own_term = w * w * diag  # W_ij²·C_jj: a weight's error on its own
    for _ in range(cycles):
        grow_cost = torch.where(~mask, own_term - 2 * w * g, inf)
        grow = grow_cost.argmin(1)
        g_grown = g - w[rows, grow, None] * c[grow]
        candidates = mask.clone()
        if block is not None:
            candidates &= (cols[None, :] // block) == (grow[:, None] // block)
        prune_cost = torch.where(candidates, own_term + 2 * w * g_grown, inf)
        prune = prune_cost.argmin(1)
        change = grow_cost[rows, grow] + prune_cost[rows, prune]
        error = (w * ~mask * g).sum(1)
        accept = active & torch.isfinite(change) & (change < -1e-9 * error.clamp_min(1e-30))
        if not accept.any():
            break
        r = accept.nonzero().squeeze(1)
        mask[r, grow[r]] = True
        mask[r, prune[r]] = False
        g[r] = g_grown[r] + w[r, prune[r], None] * c[prune[r]]
        active = accept
    return mask
