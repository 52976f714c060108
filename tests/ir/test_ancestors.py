"""fxforge.ir.ancestors: each node once, depth first, and `through` stops the walk below a node."""
import torch
from torch.fx import symbolic_trace

from fxforge.ir.ancestors import ancestors


class _Diamond(torch.nn.Module):
    def forward(self, x, y):
        a = x + 1
        b = a * 2
        c = a - 3
        return b + c + y.sum()


def test_each_ancestor_once_and_through_stops_the_walk():
    gm = symbolic_trace(_Diamond())
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    names = [n.name for n in ancestors(out)]
    assert len(names) == len(set(names)) and {"x", "y", "add", "mul", "sub", "sum_1"} <= set(names)
    stopped = [n.name for n in ancestors(out, through=lambda n: n.name != "add")]
    assert "add" in stopped and "x" not in stopped and "y" in stopped
