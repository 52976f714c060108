"""`refresh_meta` (fxforge/ir/graph.py) propagates shapes again only when something it depends on
changed: a second call on an unchanged graph (a pass that refreshed itself, then the pipeline's
`finalize`) is skipped, while a rewritten node, a weight of another shape under the same name, or
a hand-set metadata value is propagated again."""
import torch
from torch import nn

import fxforge.ir.graph as graph_module
from fxforge.ir.graph import get_attr, refresh_meta, set_attr
from fxforge.ir.trace import trace

aten = torch.ops.aten


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _traced():
    return trace(_Mlp().eval(), (torch.randn(2, 3, 8),))


def _counting(monkeypatch):
    runs = [0]
    original = graph_module._MetaInterpreter.run

    def run(self, *args, **kwargs):
        runs[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(graph_module._MetaInterpreter, "run", run)
    return runs


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]


def test_an_unchanged_graph_is_not_propagated_twice(monkeypatch):
    runs = _counting(monkeypatch)
    gm = _traced()
    refresh_meta(gm)
    refresh_meta(gm)
    assert runs[0] == 1
    output = gm.graph.output_node()  # the output node carries no metadata: changing it costs nothing
    output.args = ((output.args[0][0], output.args[0][0]),)
    refresh_meta(gm)
    assert runs[0] == 1


def test_a_weight_of_another_shape_under_the_same_name_is_propagated(monkeypatch):
    runs = _counting(monkeypatch)
    gm = _traced()
    refresh_meta(gm)
    down = _linears(gm)[-1]
    assert tuple(down.meta["val"].shape[-1:]) == (4,)
    weight = down.args[1].target
    set_attr(gm, weight, torch.randn(6, 16))
    set_attr(gm, down.args[2].target, torch.randn(6))
    refresh_meta(gm)
    assert runs[0] == 2 and tuple(down.meta["val"].shape[-1:]) == (6,)
    assert get_attr(gm, weight).shape == (6, 16)


def test_a_rewritten_node_and_a_hand_set_value_are_propagated(monkeypatch):
    runs = _counting(monkeypatch)
    gm = _traced()
    refresh_meta(gm)
    up = _linears(gm)[0]
    relu = next(iter(up.users))
    with gm.graph.inserting_after(up):
        negated = gm.graph.call_function(aten.neg.default, (up,))
    relu.replace_input_with(up, negated)
    refresh_meta(gm)
    assert runs[0] == 2 and negated.meta["val"].shape == up.meta["val"].shape
    relu.meta["val"] = None  # set by hand: not trusted as propagated
    refresh_meta(gm)
    assert runs[0] == 3 and relu.meta["val"].shape == up.meta["val"].shape
