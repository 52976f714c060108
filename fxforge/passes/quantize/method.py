"""The shape every method of pass `quantize` has: one class, its own options, one record back.

A method is a frozen dataclass registered with `@register_method("quantize")` (see
`fxforge/passes/methods.py`); its fields are its own options (gptq's damp, awq's awq_grid, ...).
The pass hands it, per block of layers (all layers at once for data-free methods):

    notes = method.prepare_block(gm, sites, specs, stats, group_axis, semantics)
    layer = method.quantize(matrix, spec, site, stats, group_axis)   # for each site

`stats` maps a layer node's name to the `InputStatistics` the method asked for in `statistics`
(empty for data-free methods); every method returns a `QuantizedLayer` (codes, plus float
outliers for methods that keep some), so the pass has no per-method special cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import Tensor
from torch.fx import GraphModule

from fxforge.passes.methods import Method

if TYPE_CHECKING:
    from fxforge.calibration.observers import InputStatistics
    from fxforge.ir.graph import LinearSite
    from fxforge.ir.reference import Semantics
    from fxforge.passes.quantize.easyquant import SparseOutliers
    from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec

__all__ = ["WeightQuantizer", "QuantizedLayer", "FAMILY"]

FAMILY = "quantize"


@dataclass
class QuantizedLayer:
    """What a method chose for one layer: integer codes, and float outliers kept beside them
    (EasyQuant; None for the others), both in the oriented matrix's coordinates."""

    matrix: QuantizedMatrix
    outliers: SparseOutliers | None = None


@dataclass(frozen=True)
class WeightQuantizer(Method):
    """Base of quantize's methods (rtn, awq, gptq, easyquant).

    takes_low_precision: the method converts the weight to float32 itself (rtn a chunk of rows
    at a time, gptq into its one working copy), so the pass hands it a bf16/fp16 weight as it is
    instead of a float32 copy of the whole matrix (an LM head's: twice the weight's bytes at once).
    """

    takes_low_precision: ClassVar[bool] = False

    def prepare_block(self, gm: GraphModule, sites: list[LinearSite], specs: Mapping[str, QuantSpec],
                      stats: Mapping[str, InputStatistics], group_axis: str, semantics: Semantics) -> dict[str, Any]:
        """Anything done to a block before its layers are quantized (AWQ folds its scales); returns notes."""
        return {}

    def quantize(self, matrix: Tensor, spec: QuantSpec, site: LinearSite, stats: InputStatistics | None,
                 group_axis: str) -> QuantizedLayer:
        """Codes for one layer's oriented weight `matrix` (see common.orient)."""
        raise NotImplementedError

    def finish(self, notes: dict[str, Any]) -> None:
        """After every block: warn about what the notes show (GPTQ's singular Hessians)."""
