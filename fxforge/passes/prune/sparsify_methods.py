"""The methods of `sparsify`, one class each, with their own options.

magnitude  |W_ij|, lowest of the whole layer; no data.
wanda      |W_ij|·‖X_j‖₂ (arXiv 2306.11695), lowest of each output row; reads calibration data.
dsnot      Wanda's mask refined by DSnoT's swaps (`masks.dsnot_refine`), needs E[x xᵀ] as well.

A method turns a weight and its input statistics into scores (`scores`), says whether the
`sparsity` fraction is removed per row or per layer (`per_row`), and may refine the mask the
pass chose from those scores (`refine`); the pass owns the N:M / unstructured choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fxforge.calibration.observers import InputStatistics
from fxforge.passes.methods import Method, register_method
from fxforge.passes.prune.masks import dsnot_refine
from fxforge.passes.prune.scoring import check_calibration_batches


@dataclass(frozen=True)
class SparsifyMethod(Method):
    """A `sparsify(method=...)` method. `per_row`: remove `sparsity` of each output row (else
    of the whole layer) when unstructured. `statistics`: what the calibration engine observes
    at each layer's input (`stats` below), block by block."""

    per_row: ClassVar[bool] = True

    def scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> torch.Tensor:
        """(out, in) importance of each weight; higher = keep."""
        raise NotImplementedError

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats: InputStatistics | None,
               block: int | None) -> torch.Tensor:
        """The final keep-mask from the one chosen by score (`block`: M of an N:M pattern)."""
        return mask


@register_method("sparsify")
@dataclass(frozen=True)
class Magnitude(SparsifyMethod):
    """No options: |W| alone decides, across the whole layer."""

    name = "magnitude"
    per_row = False

    def scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> torch.Tensor:
        return weight.abs()


@register_method("sparsify")
@dataclass(frozen=True)
class Wanda(SparsifyMethod):
    """calibration_batches: calibration items read for ‖X_j‖₂."""

    name = "wanda"
    needs_calibration = True
    statistics = ("moments",)
    calibration_batches: int = 16

    def __post_init__(self) -> None:
        check_calibration_batches(f"sparsify(method={self.name})", self.calibration_batches)

    def scores(self, weight: torch.Tensor, stats: InputStatistics | None) -> torch.Tensor:
        return weight.abs() * stats.norm[None, :]


@register_method("sparsify")
@dataclass(frozen=True)
class Dsnot(Wanda):
    """dsnot_cycles: at most this many swaps per row (0 = Wanda's mask unchanged)."""

    name = "dsnot"
    statistics = ("moments", "gram")
    dsnot_cycles: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dsnot_cycles, int) or self.dsnot_cycles < 0:
            raise ValueError(f"sparsify: dsnot_cycles must be >= 0, got {self.dsnot_cycles}")

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats: InputStatistics | None,
               block: int | None) -> torch.Tensor:
        return dsnot_refine(weight, mask, stats.hessian, self.dsnot_cycles, block=block)
