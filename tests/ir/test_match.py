"""fxforge.ir.match: whole patterns with named captures, reasons for failed candidates, rules."""
import torch
from graph_text import assert_graph

from fxforge.ir.match import Attr, Capture, Casts, Lit, Op, Rule, Through, apply_rules, match, read, replace_root
from fxforge.passes.fuse_rms_norm import PATTERN

aten = torch.ops.aten


class Norm(torch.nn.Module):
    """RMSNorm written in aten ops, with switches for the spellings the pattern must tell apart."""

    def __init__(self, dim=-1, weight_first=True, cast=True, exponent=2):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))
        self.dim, self.weight_first, self.cast, self.exponent = dim, weight_first, cast, exponent

    def forward(self, x):
        x32 = aten.to.dtype(x, torch.float32) if self.cast else x
        var = aten.mean.dim(aten.pow.Tensor_Scalar(x32, self.exponent), [self.dim], True)
        normed = aten.mul.Tensor(aten.rsqrt.default(aten.add.Tensor(var, 1e-6)), x32)
        if self.cast:
            normed = aten.to.dtype(normed, torch.float32)
        return aten.mul.Tensor(self.w, normed) if self.weight_first else aten.mul.Tensor(normed, self.w)


def _root(gm):
    return next(iter(n for n in gm.graph.nodes if n.op == "output")).args[0]


def test_captures_with_casts_and_either_operand_order():
    for weight_first in (True, False):
        for cast in (True, False):
            gm = torch.fx.symbolic_trace(Norm(weight_first=weight_first, cast=cast))
            found = match(PATTERN, _root(gm))
            assert found, found
            assert found["weight"].target == "w" and found["eps"] == 1e-6
            assert found["x32"].name == ("to_dtype" if cast else "x")


def test_a_failed_candidate_says_where_it_differs():
    found = match(PATTERN, _root(torch.fx.symbolic_trace(Norm(dim=0))))
    assert not found and "expected [-1], got [0]" in found.reason and "mean" in found.reason
    found = match(PATTERN, _root(torch.fx.symbolic_trace(Norm(exponent=3))))
    assert not found and "expected 2, got 3" in found.reason


def test_a_capture_named_twice_must_be_the_same_node():
    def two_inputs(x, y):
        return aten.mul.Tensor(x, aten.add.Tensor(y, 1.0))

    same = Op(aten.mul.Tensor, Capture("a"), Op(aten.add.Tensor, Capture("a"), Lit(1.0)))
    found = match(same, _root(torch.fx.symbolic_trace(two_inputs)))
    assert not found and "is not the `x` (placeholder) captured before" in found.reason


def test_single_use_and_private_casts():
    def shared(x):
        r = aten.rsqrt.default(x)
        return aten.mul.Tensor(r, x), r

    pattern = Op(aten.mul.Tensor, Op(aten.rsqrt.default, Capture("x"), single_use=True), Capture("other"))
    found = match(pattern, _root(torch.fx.symbolic_trace(shared))[0])
    assert not found and "has 2 users" in found.reason

    def shared_cast(x):
        c = aten.to.dtype(x, torch.float32)
        return aten.add.Tensor(aten.neg.default(c), c)

    found = match(Op(aten.add.Tensor, Capture("n"), Casts(Capture("x"))), _root(torch.fx.symbolic_trace(shared_cast)))
    assert not found and "cast `to_dtype`" in found.reason


def test_rule_check_refuses_with_its_reason_and_rewrite_replaces_the_root():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return aten.mul.Tensor(aten.mul.Tensor(x, self.w), 2.0), aten.mul.Tensor(x, -1.0)

    gm = torch.fx.symbolic_trace(Scale())
    rule = Rule(
        "times_constant",
        Op(aten.mul.Tensor, Capture("x"), Capture("k", float)),
        check=lambda m: None if m["k"] > 0 else f"k={m['k']} is not positive",
        rewrite=lambda g, m: replace_root(g, m, aten.div.Tensor, (m["x"], 1 / m["k"])),
    )
    result = apply_rules(gm, [rule])
    assert result.rewrites == 1
    assert [(n.name, why) for n, why in result.refused] == [("mul_tensor_2", "times_constant: k=-1.0 is not positive")]
    assert_graph(gm, """
        x = input()
        mul_tensor = aten.mul.Tensor(x, @w)
        div_tensor = aten.div.Tensor(mul_tensor, 0.5)
        mul_tensor_2 = aten.mul.Tensor(x, -1.0)
        return (div_tensor, mul_tensor_2)
    """)


def test_attr_takes_only_parameters_and_buffers():
    def no_weight(x, w):
        return aten.mul.Tensor(w, x)

    found = match(Op(aten.mul.Tensor, Attr("weight"), Capture("x")), _root(torch.fx.symbolic_trace(no_weight)))
    assert not found and "weight: `w` (placeholder) is not a parameter or buffer (get_attr)" in found.reason


def _step_through_neg(value):
    """A step for `Through`: look through neg nodes (a stand-in for attention's identity rules)."""
    return value.args[0] if isinstance(value, torch.fx.Node) and value.target == aten.neg.default else None


def test_through_looks_past_any_number_of_steps_and_not_past_others():
    def chained(x):
        return aten.exp.default(aten.neg.default(aten.neg.default(aten.relu.default(x))))

    pattern = Op(aten.exp.default, Through(Op(aten.relu.default, Capture("x")), _step_through_neg))
    found = match(pattern, _root(torch.fx.symbolic_trace(chained)))
    assert found and found["x"].name == "x"

    def blocked(x):
        return aten.exp.default(aten.abs.default(aten.relu.default(x)))

    found = match(pattern, _root(torch.fx.symbolic_trace(blocked)))
    assert not found and "got `abs_default`" in found.reason


def test_read_returns_the_first_accepted_description_and_leaves_the_graph_alone():
    def scaled(x):
        return aten.mul.Tensor(x, 0.5), aten.mul.Tensor(x, 0.0), aten.add.Tensor(x, 1.0)

    gm = torch.fx.symbolic_trace(scaled)
    before = str(gm.graph)
    rules = [
        Rule("zero", Op(aten.mul.Tensor, Capture("x"), Lit(0.0)), rewrite=lambda g, m: ("zero", m["x"])),
        Rule("scale", Op(aten.mul.Tensor, Capture("x"), Capture("c", float)), rewrite=lambda g, m: (m["x"], m["c"]),
             check=lambda m: None if m["c"] != 0.0 else "scale by zero"),
    ]
    half, zero, add = _root(gm)
    assert read(rules, half) == (gm.graph.find_nodes(op="placeholder")[0], 0.5)
    assert read(rules, zero)[0] == "zero"  # the first row that matches wins
    refused = read(rules[1:], zero)
    assert not refused and refused.reason == "scale: scale by zero"
    missed = read(rules, add)
    assert not missed and missed.reason.startswith("zero: expected aten.mul.Tensor") and "; scale: expected" in missed.reason
    assert not read(rules, 3.0) and "is no node" in read(rules, 3.0).reason
    assert str(gm.graph) == before
