"""EVA (Paischer et al., 2024): data-driven LoRA init from the principal directions of each layer's inputs.

For every target layer, the inputs x seen over the calibration batches are accumulated (their
sum and Σxᵀx, so the PCA is exact and incremental); after each batch the top components are
recomputed and the layer has converged when its top-r components agree with the previous
estimate (|cosine| ≥ eva_tau each). Then ranks are redistributed globally: every layer offers
round(r·eva_rho) components, the r·(number of layers) with the largest explained-variance
ratios win, so a layer's rank is how many of its components won (0 -> the layer is skipped).

    A = the layer's top components (rank, in),  B = 0,  W unchanged,  s = α / r (the nominal
    rank, so the scaling stays α/r as PEFT's adjust_scaling_factors does)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import LinearSite
from fxforge.passes.adapters.common import (
    AdapterMethod,
    LayerContext,
    LayerInit,
    record_site_inputs,
)
from fxforge.passes.methods import register_method


@dataclass
class _Moments:
    """Running sum, scatter Σxᵀx and count of one layer's input rows (float64)."""

    total: Tensor
    scatter: Tensor
    count: int = 0

    def add(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).double()
        self.total += rows.sum(0)
        self.scatter += rows.t() @ rows
        self.count += rows.shape[0]

    def pca(self) -> tuple[Tensor, Tensor]:
        """(components (k, in) by decreasing variance, explained-variance ratios (k,))."""
        mean = self.total / max(self.count, 1)
        cov = self.scatter / max(self.count, 1) - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        return vectors.t(), values / values.sum().clamp_min(1e-30)


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
    statistics = ("moments", "gram")
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

    def prepare(self, gm: GraphModule, sites: list[LinearSite], ctx: Any, rank: int) -> dict[str, Any]:
        ctx.require_calibration("add_adapters", method=self.name)
        moments = {s.module_path: _Moments(torch.zeros(s.in_features, dtype=torch.float64),
                                           torch.zeros(s.in_features, s.in_features, dtype=torch.float64))
                   for s in sites}
        offered = {s.module_path: min(round(rank * self.eva_rho), s.in_features, s.out_features)
                   for s in sites}
        previous: dict[str, Tensor | None] = {path: None for path in moments}
        converged: set[str] = set()
        batches = ctx.progress(ctx.calibration_batches(gm, self.calibration_limit, pass_name="add_adapters",
                                                         method=self.name), desc="eva: layer inputs",
                               total=self.calibration_limit)
        seen = 0
        for flat in batches:
            record_site_inputs(gm, sites, flat, lambda path, x: moments[path].add(x))
            seen += 1
            for path, m in moments.items():
                components, _ = m.pca()
                if pca_converged(previous[path], components, rank, self.eva_tau):
                    converged.add(path)
                previous[path] = components
            if len(converged) == len(moments):
                break  # every layer's top directions are stable: more data would not move them
        pcas = {path: m.pca() for path, m in moments.items()}
        ranks = redistribute_ranks({p: pcas[p][1][:offered[p]] for p in pcas}, rank * len(sites))
        return {path: {"components": pcas[path][0], "rank": ranks[path], "converged": path in converged,
                       "batches": seen} for path in pcas}

    def init(self, layer: LayerContext) -> LayerInit:
        data = layer.data
        rank = data["rank"]
        out_features = layer.weight.shape[0]
        dtype = layer.weight.dtype
        a = data["components"][:rank].to(dtype).contiguous()
        b = torch.zeros(out_features, rank, dtype=dtype)
        return LayerInit(trainable={"lora_A": a, "lora_B": b}, rank=rank, scale=self.scale(layer.rank, layer.alpha))
