"""Capture what data-driven quantizers need from the inputs of linear layers.

One pass over `ctx.calibration_batches(gm, limit)` with an FX interpreter records, for each
requested `aten.linear` node, the Gram matrix H = Σ xᵀx of its input rows (GPTQ's Hessian,
LLM-FP4's and AWQ's output-error weighting) and a random subsample of input rows (AWQ's block
outputs, clip search). Activations come from the float graph before any rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from fxforge.ir.graph import LinearSite
from fxforge.passes.context import PassContext


@dataclass
class LinearInputStats:
    """Statistics of one linear layer's input rows x (in_features,) over the calibration set."""

    gram: Tensor                      # float64 (K, K): Σ xᵀx
    rows: int = 0                     # how many rows were accumulated
    samples: list[Tensor] = field(default_factory=list)  # float32 row subsamples
    abs_sum: Tensor | None = None     # float64 (K,): Σ |x|

    @property
    def hessian(self) -> Tensor:
        """H = XᵀX / n in float32."""
        return (self.gram / max(self.rows, 1)).to(torch.float32)

    @property
    def mean_abs(self) -> Tensor:
        """x̄_j = mean |x_j| over rows (AWQ's activation salience)."""
        return (self.abs_sum / max(self.rows, 1)).to(torch.float32)

    def sample(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else self.gram.new_zeros((0, self.gram.shape[0])).float()


class _Capture(Interpreter):
    def __init__(self, gm: GraphModule, stats: dict[str, LinearInputStats], rows_per_batch: int,
                 generator: torch.Generator):
        super().__init__(gm)
        self.stats, self.rows_per_batch, self.generator = stats, rows_per_batch, generator

    def run_node(self, n: Node) -> Any:
        if n.name in self.stats:
            x = self.env[n.args[0]] if isinstance(n.args[0], Node) else n.args[0]
            self._record(self.stats[n.name], x)
        return super().run_node(n)

    def _record(self, s: LinearInputStats, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        s.gram += rows.T.double() @ rows.double()
        s.abs_sum += rows.abs().sum(0).double()
        s.rows += rows.shape[0]
        keep = min(self.rows_per_batch, rows.shape[0])
        pick = torch.randperm(rows.shape[0], generator=self.generator)[:keep]
        s.samples.append(rows[pick])


def require_batches(ctx: PassContext, pass_name: str, method: str, sites: Iterable[LinearSite]) -> None:
    """A CalibrationError naming the layers and the fix when calibration data is missing or empty."""
    names = [s.module_path for s in sites]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    ctx.require_calibration(
        pass_name, f"calibration data to quantize layer(s) {shown}", method=method,
        hint=" Or use a data-free method (rtn, easyquant). The model was not changed.")


def capture_linear_inputs(gm: GraphModule, ctx: PassContext, sites: Iterable[LinearSite], *,
                          max_batches: int = 128, rows_per_batch: int = 256, pass_name: str | None = None,
                          method: str | None = None) -> dict[str, LinearInputStats]:
    """{linear node name: LinearInputStats} over at most `max_batches` calibration items.

    `pass_name`/`method` name the reader in CalibrationErrors (missing, empty or bad batches).
    """
    stats = {}
    for site in sites:
        k = site.in_features
        stats[site.node.name] = LinearInputStats(gram=torch.zeros(k, k, dtype=torch.float64),
                                                 abs_sum=torch.zeros(k, dtype=torch.float64))
    generator = torch.Generator().manual_seed(ctx.seed)
    capture = _Capture(gm, stats, rows_per_batch, generator)
    batches = list(ctx.calibration_batches(gm, max_batches, pass_name=pass_name, method=method))
    with torch.no_grad():
        for flat in ctx.progress(batches, desc="calibration", total=len(batches)):
            capture.run(*flat)
    return stats
