"""Bad inputs to verification, each rejected with the right error class and a clear message, and
with the user's graph unchanged: malformed `max_loss` bounds (on compile and on a pass), loss
beyond a bound, and broken rewrites (layout bugs, shape-specific bugs, wrong claims)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx import GraphModule
from verification_helpers import (
    InvertedMaskSparsify, MisalignedPrune, OffByOneGroupQuantize, WrongAtBatch3Quantize, traced_tinyllama,
)

import fxforge
from fxforge.errors import PassError, PassSpecError
from fxforge.ir.graph import get_attr, set_attr
from fxforge.ir.reference import Semantics
from fxforge.ir.verify import run_graph
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize import Quantize

HIDDEN = 128  # group 128 still applies; half the width of tests/passes/test_verification.py's model


@torch.library.custom_op("fxforge_test::raises_at_batch_3", mutates_args=())
def raises_at_batch_3(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 3:
        raise RuntimeError("kernel has no path for batch 3")
    return x.clone()


@raises_at_batch_3.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _first_linear(gm: GraphModule) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)


@dataclasses.dataclass(frozen=True)
class CrashesAtBatch3(Pass):
    """Claims to be exact; its graph raises at batch 3 (the second verification shape)."""

    name = "crashes_at_batch_3"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        first = _first_linear(gm)
        with gm.graph.inserting_after(first):
            node = gm.graph.call_function(torch.ops.fxforge_test.raises_at_batch_3.default, (first,))
        first.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        return PassResult(gm, sites=1)


@dataclasses.dataclass(frozen=True)
class ExactButNot(Pass):
    """Claims to be exact (no semantics) but scales a weight by 1.01."""

    name = "exact_but_not"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        name = _first_linear(gm).args[1].target
        set_attr(gm, name, get_attr(gm, name).detach() * 1.01)
        return PassResult(gm, sites=1)


@dataclasses.dataclass(frozen=True)
class ClaimsMissingWeight(Pass):
    """Declares semantics for a weight the graph does not have."""

    name = "claims_missing_weight"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, semantics=Semantics(weights={"model.no_such.weight": torch.zeros(2, 2)}))


@dataclasses.dataclass(frozen=True)
class ClaimsWrongShape(Pass):
    """Declares a replacement weight of the wrong shape: its reference cannot run."""

    name = "claims_wrong_shape"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        name = _first_linear(gm).args[1].target
        return PassResult(gm, semantics=Semantics(weights={name: torch.zeros(3, 5)}))


@pytest.fixture(scope="module")
def traced():
    return traced_tinyllama(HIDDEN)


@pytest.fixture()
def graph(traced):
    model, kwargs, gm, ctx = traced
    snapshot = ({n: t.clone() for n, t in gm.state_dict().items()}, run_graph(gm, ctx.example_inputs))
    yield gm, ctx
    state, outputs = snapshot  # whatever failed, the user's graph is as it was
    assert all(torch.equal(t, state[n]) for n, t in gm.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(run_graph(gm, ctx.example_inputs), outputs))


# --------------------------------------------------------------------------- malformed bounds


@pytest.mark.parametrize("max_loss, fragment", [
    ("loose", "max_loss must be a number"),
    (-0.1, "rel_l2 must be >= 0"),
    ({"cos": 0.9}, "unknown metric(s) ['cos']"),
    ({"rel_l2": "0.3"}, "rel_l2 must be a number"),
    (True, "max_loss must be a number"),
    (float("nan"), "rel_l2 must be a number"),
    ({"max_abs": -1}, "max_abs must be >= 0"),
    ([0.1], "max_loss must be a number"),
], ids=["string", "negative", "unknown-metric", "string-bound", "bool", "nan", "negative-abs", "list"])
def test_malformed_max_loss_on_compile_fails_before_tracing(max_loss, fragment):
    class Untraceable(torch.nn.Module):  # tracing it would raise something else: the bound is checked first
        def forward(self, x):
            raise AssertionError("traced")

    with pytest.raises(PassSpecError) as info:
        fxforge.compile(Untraceable(), (torch.randn(2, 4),), max_loss=max_loss)
    assert fragment in str(info.value)


@pytest.mark.parametrize("max_loss, fragment", [
    ({"cosine": 0.9}, "unknown metric(s) ['cosine']"),
    ("0.1", "max_loss must be a number"),
], ids=["cosine-key", "string"])
def test_malformed_max_loss_on_a_pass_names_the_pass(graph, max_loss, fragment):
    gm, ctx = graph
    with pytest.raises(PassSpecError) as info:
        run_pass(Quantize(bits=4, max_loss=max_loss), gm, ctx)
    assert "pass 'quantize(" in str(info.value) and fragment in str(info.value)


# --------------------------------------------------------------------------- loss beyond a bound


@pytest.mark.parametrize("max_loss, fragment", [
    (0.01, "rel_l2 = "),
    ({"max_abs": 1e-6}, "max_abs = "),
    ({"min_cosine": 0.999999}, "cosine = "),
], ids=["rel_l2", "max_abs", "min_cosine"])
def test_loss_beyond_max_loss_is_rejected_naming_pass_metric_value_and_bound(graph, max_loss, fragment):
    gm, ctx = graph
    with pytest.raises(PassError) as info:
        run_pass(Quantize(bits=2), gm, ctx, max_loss=max_loss)
    message = str(info.value)
    assert info.value.pass_name == "quantize"
    assert "pass 'quantize(bits=2)' lost more than max_loss allows" in message and fragment in message
    assert "bound:" in message and "input graph is unchanged" in message


# --------------------------------------------------------------------------- broken rewrites


@pytest.mark.parametrize("broken, fragment", [
    (OffByOneGroupQuantize(bits=4), "does not compute what it claims to compute (its semantics"),
    (WrongAtBatch3Quantize(bits=4), "at input shape 3x12, 3x12"),
    (InvertedMaskSparsify(method="magnitude"), "does not compute what it claims"),
    (MisalignedPrune(method="magnitude", ratio=0.25), "does not compute what it claims"),
    (ExactButNot(), "the graph before (it claims to be exact)"),
    (CrashesAtBatch3(), "fails on inputs of shape 3x12, 3x12"),
    (ClaimsMissingWeight(), "declared semantics that cannot be built"),
    (ClaimsWrongShape(), "declared semantics whose reference graph fails"),
], ids=lambda v: getattr(v, "name", "message"))
def test_broken_rewrites_are_rolled_back_and_named(graph, broken, fragment):
    gm, ctx = graph
    with pytest.raises(PassError) as info:
        run_pass(broken, gm, ctx)
    assert info.value.pass_name == broken.name
    assert f"pass '{broken.spec()}'" in str(info.value) and fragment in str(info.value)
