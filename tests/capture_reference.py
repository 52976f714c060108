"""The calibration captures of prune/sparsify (fxforge/passes/prune/capture.py) and EVA
(fxforge/passes/adapters/common.py's _InputRecorder) up to issue 15, kept as the oracle the
calibration engine's statistics are measured against (tests/passes/test_engine_port.py):
float64 sums over the whole graph run by an FX interpreter, all layers at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one linear layer's input over the calibration data."""

    count: int
    total: torch.Tensor  # Σ x_j   (in,) float64
    total_sq: torch.Tensor  # Σ x_j² (in,) float64
    gram: torch.Tensor | None = None  # Σ x xᵀ (in, in) float64, when asked for

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] (in, in) float64; needs capture with `second_moment=True`."""
        if self.gram is None:
            raise ValueError("these statistics were captured without second_moment=True")
        return self.gram / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()

    @property
    def fluctuation(self) -> torch.Tensor:
        mean = self.total / max(self.count, 1)
        return (self.total_sq / max(self.count, 1) - mean * mean).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:
        return self.total_sq.sqrt().float()


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, nodes: Sequence[Node], second_moment: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = {n.name for n in nodes}
        self.second_moment = second_moment
        self.stats: dict[str, ChannelStats] = {}

    def run_node(self, n: Node) -> Any:
        if n.name in self.watch:
            x = self.env[n.args[0]] if isinstance(n.args[0], Node) else n.args[0]
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            s = self.stats.get(n.name)
            if s is None:
                width = flat.shape[1]
                gram = torch.zeros(width, width, dtype=torch.float64) if self.second_moment else None
                s = self.stats[n.name] = ChannelStats(0, torch.zeros(width, dtype=torch.float64),
                                                      torch.zeros(width, dtype=torch.float64), gram)
            if s.gram is not None:
                s.gram += flat.T @ flat
            s.count += flat.shape[0]
            s.total += flat.sum(0)
            s.total_sq += (flat * flat).sum(0)
        return super().run_node(n)


def capture_input_stats_reference(gm: GraphModule, nodes: Sequence[Node], batches: Iterable[Sequence[Any]],
                        progress: Any = None, second_moment: bool = False) -> dict[str, ChannelStats]:
    """Statistics of the first argument of each node in `nodes`, keyed by node name.

    second_moment: also accumulate Σ x xᵀ (`ChannelStats.second_moment`).

    `batches` yields the graph's flat inputs (`PassContext.calibration_batches(gm)`). Raises
    ValueError when it yields nothing, since every statistic would be empty.
    """
    capture = _Capture(gm, nodes, second_moment)
    seen = 0
    iterable = progress(batches, desc="calibration") if progress else batches
    with torch.no_grad():
        for flat in iterable:
            capture.run(*flat)
            seen += 1
    if not seen:
        raise ValueError("no calibration batches: pass calibration=<iterable of model inputs>")
    return capture.stats


class _InputRecorder(torch.fx.Interpreter):
    """Runs a graph and hands the input x of chosen linear nodes to a callback."""

    def __init__(self, gm: GraphModule, watched: dict[str, str], callback: Any):
        super().__init__(gm)
        self.watched, self.callback = watched, callback

    def run_node(self, n: Node) -> Any:
        if n.name in self.watched:
            x = self.fetch_args_kwargs_from_env(n)[0][0]
            self.callback(self.watched[n.name], x.detach())
        return super().run_node(n)


def record_site_inputs_reference(gm: GraphModule, sites: list, flat_inputs: list[Any], callback: Any) -> None:
    """Run `gm` once; call `callback(module_path, x)` with the input of every site's linear."""
    watched = {site.node.name: site.module_path for site in sites}
    with torch.no_grad():
        _InputRecorder(gm, watched, callback).run(*flat_inputs)


class _Moments:
    """Running sum, scatter Σxᵀx and count of one layer's input rows (float64): EVA's old state."""

    def __init__(self, width: int):
        self.total = torch.zeros(width, dtype=torch.float64)
        self.scatter = torch.zeros(width, width, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).double()
        self.total += rows.sum(0)
        self.scatter += rows.t() @ rows
        self.count += rows.shape[0]

    def pca(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / max(self.count, 1)
        cov = self.scatter / max(self.count, 1) - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        return vectors.t(), values / values.sum().clamp_min(1e-30)


def eva_pca_reference(gm: GraphModule, sites: list, batches: Iterable[Sequence[Any]]) -> dict[str, tuple]:
    """{module path: (components, explained-variance ratios)} over every batch (EVA with eva_tau=1,
    where no layer stops early), as the old interpreter-based EVA computed them."""
    moments = {s.module_path: _Moments(s.in_features) for s in sites}
    for flat in batches:
        record_site_inputs_reference(gm, sites, list(flat), lambda path, x: moments[path].add(x))
    return {path: m.pca() for path, m in moments.items()}
