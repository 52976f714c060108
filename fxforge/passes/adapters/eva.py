"""EVA (Paischer et al., 2024): data-driven LoRA init from the principal directions of each layer's inputs.

For every target layer, the inputs x seen over the calibration batches are accumulated (their
sum and Σxᵀx in float64, so the PCA is exact and incremental) by an `EvaObserver` the
calibration engine runs at each layer's input, in one sweep over the blocks. After each batch
the observer recomputes the top components; once its top-r components agree with the previous
estimate (|cosine| ≥ eva_tau each) the layer has converged and stops accumulating, as PEFT's
EVA removes a converged layer's hook. Then ranks are redistributed globally: every layer offers
round(r·eva_rho) components, the r·(number of layers) with the largest explained-variance
ratios win, so a layer's rank is how many of its components won (0 -> the layer is skipped).

    A = the layer's top components (rank, in),  B = 0,  W unchanged,  s = α / r (the nominal
    rank, so the scaling stays α/r as PEFT's adjust_scaling_factors does)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxforge.calibration.engine import calibrate
from fxforge.calibration.observers import Observer
from fxforge.ir.graph import LinearSite
from fxforge.passes.adapters.common import AdapterMethod, LayerContext, LayerInit
from fxforge.passes.methods import register_method


def pca(total: Tensor, scatter: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(components (k, in) by decreasing variance, explained-variance ratios (k,)) of rows whose
    sum is `total`, Σxᵀx `scatter` and number `count` (float64)."""
    mean = total / max(count, 1)
    cov = scatter / max(count, 1) - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    return vectors.t(), values / values.sum().clamp_min(1e-30)


class EvaObserver(Observer):
    """Σx and Σxᵀx (float64) of one input's rows until its top `rank` components converge.

    One update is one calibration batch (the engine observes each batch once). Subclassed per
    pass run with the run's `rank` and `tau` (`Eva.observer`), since the engine builds observers
    from their class.
    """

    name = "eva"
    rank: ClassVar[int] = 1
    tau: ClassVar[float] = 1.0

    def __init__(self, width: int, **config: Any):
        super().__init__(width)
        self.total = torch.zeros(width, dtype=torch.float64)
        self.scatter = torch.zeros(width, width, dtype=torch.float64)
        self.previous: Tensor | None = None
        self.converged = False
        self.batches = 0

    def update(self, rows: Tensor) -> None:
        if self.converged:
            return  # more data would not move the top directions
        rows = rows.double()
        self.total += rows.sum(0)
        self.scatter += rows.t() @ rows
        self.rows += rows.shape[0]
        self.batches += 1
        components, _ = pca(self.total, self.scatter, self.rows)
        self.converged = pca_converged(self.previous, components, self.rank, self.tau)
        self.previous = components

    def sums(self) -> list[Tensor]:
        return [self.total, self.scatter]


def pca_converged(previous: Tensor | None, current: Tensor, rank: int, tau: float) -> bool:
    """True when each of the top `rank` components moved less than `tau` in |cosine|."""
    if previous is None:
        return False
    cos = (previous[:rank] * current[:rank]).sum(-1).abs()
    return bool((cos >= tau).all())


def redistribute_ranks(ratios: dict[str, Tensor], budget: int) -> dict[str, int]:
    """Give the `budget` components with the largest explained-variance ratios to their layers."""
    offers = [(float(r), path) for path, layer in ratios.items() for r in layer]
    offers.sort(key=lambda item: -item[0])
    counts = Counter(path for _, path in offers[:budget])
    return {path: counts.get(path, 0) for path in ratios}


@register_method("add_adapters")
@dataclass(frozen=True)
class Eva(AdapterMethod):
    """eva_rho: each layer offers round(rank·eva_rho) components (>= 1); eva_tau: the |cosine|
    at which a layer's top components count as converged, in (0, 1]; calibration_limit: the
    most calibration items read."""

    name = "eva"
    needs_calibration = True
    adapts_quantized = True
    statistics = (EvaObserver.name,)  # the engine runs `self.observer(rank)`, an EvaObserver
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    calibration_limit: int = 16

    def __post_init__(self) -> None:
        if self.eva_rho < 1.0:
            raise ValueError(f"eva_rho must be >= 1 (a layer's rank may grow to rank·rho), got {self.eva_rho}")
        if not 0.0 < self.eva_tau <= 1.0:
            raise ValueError(f"eva_tau must be in (0, 1], got {self.eva_tau}")
        if self.calibration_limit < 1:
            raise ValueError(f"calibration_limit must be >= 1, got {self.calibration_limit}")

    def observer(self, rank: int) -> type[EvaObserver]:
        """The observer class of one run: convergence of the top `rank` components at eva_tau."""
        return type("EvaObserver", (EvaObserver,), {"rank": rank, "tau": self.eva_tau})

    def prepare(self, gm: GraphModule, sites: list[LinearSite], ctx: Any, rank: int) -> dict[str, Any]:
        ctx.require_calibration("add_adapters", method=self.name)
        observer = self.observer(rank)
        result = calibrate(gm, ctx, {s.node: (observer,) for s in sites}, pass_name="add_adapters",
                           method=self.name, max_batches=self.calibration_limit)
        by_path: dict[str, list[EvaObserver]] = {}
        for s in sites:  # a module called twice: both calls' inputs are its inputs
            seen = by_path.setdefault(s.module_path, [])
            found = result.statistics[s.node.name][EvaObserver.name]
            if all(found is not other for other in seen):
                seen.append(found)
        pcas = {path: pca(sum(o.total for o in obs), sum(o.scatter for o in obs), sum(o.rows for o in obs))
                for path, obs in by_path.items()}
        offered = {s.module_path: min(round(rank * self.eva_rho), s.in_features, s.out_features) for s in sites}
        ranks = redistribute_ranks({p: pcas[p][1][:offered[p]] for p in pcas}, rank * len(sites))
        return {path: {"components": pcas[path][0], "rank": ranks[path],
                       "converged": all(o.converged for o in by_path[path]),
                       "batches": max(o.batches for o in by_path[path])} for path in pcas}

    def init(self, layer: LayerContext) -> LayerInit:
        data = layer.data
        rank = data["rank"]
        out_features = layer.weight.shape[0]
        dtype = layer.weight.dtype
        a = data["components"][:rank].to(dtype).contiguous()
        b = torch.zeros(out_features, rank, dtype=dtype)
        return LayerInit(trainable={"lora_A": a, "lora_B": b}, rank=rank, scale=self.scale(layer.rank, layer.alpha))
