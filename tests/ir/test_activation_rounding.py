"""Ops that round activations (fxforge/ir/activation_rounding.py): exact passes after them are
proved with activations unrounded, and backends are held to ACTIVATION_ROUNDING."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxforge.backends import check_tolerance
from fxforge.errors import PassError
from fxforge.ir.activation_rounding import ACTIVATION_ROUNDING, rounding_ops, unrounded
from fxforge.ir.ops import get_op
from fxforge.ir.trace import trace
from fxforge.ir.verify import Tolerance
from fxforge.passes import verification
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass

aten = torch.ops.aten
K, N = 16, 8


class _Int8Layer(nn.Module):
    """x * 1.0 feeding fxforge::linear_int8_mixed (threshold high: no outlier column)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("qweight", torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8))
        self.register_buffer("wscale", torch.full((N,), 1e-3))

    def forward(self, x):
        return torch.ops.fxforge.linear_int8_mixed(x * 1.0, self.qweight, self.wscale, None, 1000.0)


def _boundary_input() -> torch.Tensor:
    # absmax 127 per row: scale 1, and the other values sit on x.5, where round-half-even goes
    # down for 0.5, 2.5, ... and any increase, however small, goes up: guaranteed flips
    x = torch.arange(K, dtype=torch.float32).repeat(2, 1) + 0.5
    x[:, 0] = 127.0
    return x


class _ShiftsInput(Pass):
    """Rewrites `x * 1.0` to `x + offset`: exact within the default 1e-5 when offset is 1e-6."""

    name = "shifts_input"

    def __init__(self, offset: float):
        object.__setattr__(self, "offset", offset)

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target == aten.mul.Tensor)
        node.target, node.args = aten.add.Tensor, (node.args[0], self.offset)
        gm.recompile()
        return PassResult(gm, sites=1)


@pytest.fixture(scope="module")
def graph():
    x = _boundary_input()
    return trace(_Int8Layer(), (x,), dynamic_shapes=None), x


def test_unrounded_computes_the_dequantized_linear_and_only_inside_the_context():
    x, layer = torch.randn(3, K), _Int8Layer()
    op = get_op("linear_int8_mixed").overload
    dequantized = layer.qweight.float() * layer.wscale[:, None]
    rounded = op(x, layer.qweight, layer.wscale, None, 1000.0)
    with unrounded(["linear_int8_mixed"]):
        exact = op(x, layer.qweight, layer.wscale, None, 1000.0)
    assert torch.equal(exact, F.linear(x, dequantized))
    assert not torch.equal(rounded, exact)  # the rounding is real outside the context
    codes, scale = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    with unrounded(["linear_w8a8"]):
        w8a8 = get_op("linear_w8a8").overload(x, codes, scale, None, "tensor")
    assert torch.equal(w8a8, F.linear(x, codes.float() * scale[:, None]))


def test_an_exact_pass_before_a_quantizer_verifies_though_a_rounding_flips(graph):
    gm, x = graph
    assert rounding_ops(gm) == ["linear_int8_mixed"]
    report = PipelineReport()
    run_pass(_ShiftsInput(1e-6), gm, PassContext(example_inputs=(x,)), report=report)
    record = report.records[0]
    assert record.max_error > 1e-4  # the flips are real and reported as loss
    assert "checked with activations unrounded" in record.verification_note


def test_without_unrounding_the_same_pass_is_rejected_and_a_real_bug_still_is(graph, monkeypatch):
    gm, x = graph
    with pytest.raises(PassError, match="does not compute"):  # a bug: 0.1 moves every output
        run_pass(_ShiftsInput(0.1), gm, PassContext(example_inputs=(x,)))
    monkeypatch.setattr(verification, "rounding_ops", lambda gm: [])
    with pytest.raises(PassError, match="does not compute"):  # what the matrix recorded before
        run_pass(_ShiftsInput(1e-6), gm, PassContext(example_inputs=(x,)))


def test_backends_are_held_to_the_activation_rounding_bound(graph):
    gm, _ = graph
    exact = Tolerance(max_abs=1e-4, rtol=1e-4)
    assert check_tolerance(gm, "onnx", exact) == ACTIVATION_ROUNDING
    plain = trace(nn.Linear(K, N), (torch.randn(2, K),), dynamic_shapes=None)
    assert check_tolerance(plain, "onnx", exact) == exact
