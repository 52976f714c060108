"""`refresh_meta` (fxforge/ir/graph.py) propagates again only the nodes whose value can have
changed: nothing on an unchanged graph or on its structural copy (a pass's result), the rewritten
node and (only while shapes change) its users after an edit, a node reading a weight of another
shape under the same name, and a node whose metadata value was set by hand."""
import torch
from torch import nn

import fxforge.ir.graph as graph_module
from fxforge.ir.graph import get_attr, refresh_meta, set_attr
from fxforge.ir.trace import trace
from fxforge.passes.cow import structural_copy

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
    """The nodes propagated, by name, in order."""
    propagated = []
    original = graph_module._MetaInterpreter._propagate

    def propagate(self, n):
        propagated.append(n.name)
        return original(self, n)

    monkeypatch.setattr(graph_module._MetaInterpreter, "_propagate", propagate)
    return propagated


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default]


def _fresh_shapes(gm):
    """Every node's shape propagated from scratch, by name."""
    for node in gm.graph.nodes:
        node.meta.pop(graph_module._SIGNATURE, None)
    refresh_meta(gm)
    return {n.name: str(n.meta["val"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)}


def test_an_unchanged_graph_and_its_structural_copy_are_not_propagated_again(monkeypatch):
    gm = _traced()
    refresh_meta(gm)
    propagated = _counting(monkeypatch)
    refresh_meta(gm)
    assert propagated == []
    output = gm.graph.output_node()  # the output node carries no metadata: changing it costs nothing
    output.args = ((output.args[0][0], output.args[0][0]),)
    refresh_meta(gm)
    copy = structural_copy(gm)  # new tensor objects of the same shapes: only the get_attr nodes look again
    refresh_meta(copy)
    assert propagated and set(propagated) <= {n.name for n in copy.graph.nodes if n.op == "get_attr"}


def test_a_weight_of_another_shape_under_the_same_name_is_propagated_with_its_users(monkeypatch):
    gm = _traced()
    refresh_meta(gm)
    propagated = _counting(monkeypatch)
    down = _linears(gm)[-1]
    assert tuple(down.meta["val"].shape[-1:]) == (4,)
    weight = down.args[1].target
    set_attr(gm, weight, torch.randn(6, 16))
    set_attr(gm, down.args[2].target, torch.randn(6))
    refresh_meta(gm)
    assert down.name in propagated and tuple(down.meta["val"].shape[-1:]) == (6,)
    assert _linears(gm)[0].name not in propagated  # upstream of the change: untouched
    assert get_attr(gm, weight).shape == (6, 16)


def _refreshed_mlp(monkeypatch):
    """A traced MLP after one refresh; the counter of later propagations; its up, down, relu."""
    gm = _traced()
    refresh_meta(gm)
    propagated = _counting(monkeypatch)
    up, down = _linears(gm)
    return gm, propagated, up, down, next(iter(up.users))


def test_a_rewritten_node_is_propagated_and_users_of_an_unchanged_shape_are_not(monkeypatch):
    gm, propagated, up, down, relu = _refreshed_mlp(monkeypatch)
    with gm.graph.inserting_after(up):
        negated = gm.graph.call_function(aten.neg.default, (up,))
    relu.replace_input_with(up, negated)
    refresh_meta(gm)
    # relu's input changed, its shape did not: its old value is kept, so `down` is not propagated
    assert propagated == [negated.name, relu.name]
    assert negated.meta["val"].shape == up.meta["val"].shape
    relu.meta["val"] = None  # set by hand: not trusted as propagated
    propagated.clear()
    refresh_meta(gm)
    # relu again, and its user: relu's new value is a new object (there was none to keep)
    assert propagated == [relu.name, down.name] and relu.meta["val"].shape == up.meta["val"].shape


def test_a_change_of_shape_reaches_every_user_and_matches_a_fresh_propagation(monkeypatch):
    gm, propagated, up, down, relu = _refreshed_mlp(monkeypatch)
    with gm.graph.inserting_before(down):  # (2, s, 16) -> (2, s, 8, 2) -> summed back to (2, s, 8)
        split = gm.graph.call_function(aten.view.default, (relu, [2, -1, 8, 2]))
        summed = gm.graph.call_function(aten.sum.dim_IntList, (split, [-1]))
        padded = gm.graph.call_function(aten.cat.default, ([summed, summed], -1))
    down.replace_input_with(relu, padded)
    refresh_meta(gm)
    assert {split.name, summed.name, padded.name, down.name} <= set(propagated)
    incremental = {n.name: str(n.meta["val"].shape) for n in gm.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor)}
    assert incremental == _fresh_shapes(gm)


def test_a_fresh_trace_is_not_propagated_again_and_a_rewrite_after_it_is(monkeypatch):
    propagated = _counting(monkeypatch)
    gm = _traced()  # torch.export's values are adopted (graph.adopt_meta)
    refresh_meta(gm)
    assert propagated == []
    up = _linears(gm)[0]
    with gm.graph.inserting_after(up):
        negated = gm.graph.call_function(aten.neg.default, (up,))
    next(u for u in up.users if u is not negated).replace_input_with(up, negated)
    refresh_meta(gm)
    assert negated.name in propagated and negated.meta["val"].shape == up.meta["val"].shape
