"""Calibration capture for `shift_add`: H = XᵀX/n of the inputs of chosen linear nodes.

Runs the graph on calibration batches under a torch.fx.Interpreter and accumulates, for every
requested `aten.linear` node, the second moment of its input rows (in float64, so long runs
do not lose precision). The `quantize` package's GPTQ needs the same statistics; until a
shared capture helper lands there, this small one serves shift_add.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node


class _HessianCapture(Interpreter):
    def __init__(self, gm: GraphModule, nodes: Iterable[Node]):
        super().__init__(gm)
        self.names = {n.name for n in nodes}
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def run_node(self, n: Node) -> Any:
        if n.name in self.names:
            x = self.env[n.args[0]].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self.sums[n.name] = self.sums.get(n.name, 0) + x.T @ x
            self.rows[n.name] = self.rows.get(n.name, 0) + x.shape[0]
        return super().run_node(n)


def capture_hessians(gm: GraphModule, nodes: Iterable[Node], batches: Iterable[list[Any]]) -> dict[str, Tensor]:
    """{node name: XᵀX/n (K, K) float32} of each node's first input over all `batches` (flat inputs)."""
    nodes = list(nodes)
    capture = _HessianCapture(gm, nodes)
    with torch.no_grad():
        for flat in batches:
            capture.run(*flat)
    return {name: (total / capture.rows[name]).to(torch.float32) for name, total in capture.sums.items()}
