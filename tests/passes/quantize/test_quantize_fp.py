"""quantize_fp: the formats' codes, the linear_fp op on eager and ONNX (incl. FP8 activations),
LLM-FP4's scale search, and the pass on tiny-llama."""
import pytest
import torch
from testing_utils import export_op_module, run_ort, traced_zoo

from fxforge.ir.ops.linear_fp import E2M1_VALUES, decode, encode
from fxforge.ir.ops.linear_wq import pack_bits
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize.common import relative_error
from fxforge.passes.quantize.quantize_fp import QuantizeFp, search_channel_scales

FP = torch.ops.fxforge.linear_fp.default


def test_formats_round_trip_their_own_values():
    assert torch.equal(decode(encode(E2M1_VALUES, "e2m1"), "e2m1").abs(), E2M1_VALUES.abs())
    assert decode(encode(torch.tensor([2.4, 2.6, 7.0, -5.2]), "e2m1"), "e2m1").tolist() == [2.0, 3.0, 6.0, -6.0]
    assert decode(encode(torch.tensor([500.0, 0.1]), "e4m3"), "e4m3")[0] == 448.0  # saturates, no NaN
    assert decode(encode(torch.tensor([1e5]), "e5m2"), "e5m2")[0] == 57344.0


class _FpLinear(torch.nn.Module):
    def __init__(self, fmt, act_fmt, n=24, k=64, g=32):
        super().__init__()
        w = torch.randn(n, k)
        scale = w.reshape(n, k // g, g).abs().amax(-1, keepdim=True) / {"e4m3": 448, "e5m2": 57344, "e2m1": 6}[fmt]
        codes = encode(w.reshape(n, k // g, g) / scale, fmt).reshape(n, k)
        self.register_buffer("codes", pack_bits(codes, 4) if fmt == "e2m1" else codes)
        self.register_buffer("scales", scale.squeeze(-1))
        self.bias = torch.nn.Parameter(torch.randn(n))
        self.fmt, self.act_fmt, self.g, self.w = fmt, act_fmt, g, w

    def forward(self, x):
        return torch.ops.fxforge.linear_fp(x, self.codes, self.scales, self.bias, self.fmt, self.g, self.act_fmt)


@pytest.mark.parametrize("fmt,act_fmt,bound", [("e4m3", "", 0.05), ("e5m2", "", 0.1), ("e2m1", "", 0.2),
                                               ("e2m1", "e4m3", 0.2)])
def test_op_eager_and_onnx(tmp_path, fmt, act_fmt, bound):
    module, x = _FpLinear(fmt, act_fmt), torch.randn(2, 3, 64)
    expected = module(x)
    assert 0 < relative_error(x @ module.w.T + module.bias, expected) < bound
    _, session = export_op_module(module, x, tmp_path / "fp.onnx")
    torch.testing.assert_close(run_ort(session, x), expected, rtol=1e-5, atol=1e-5)


def test_llm_fp4_search_lowers_output_error():
    w, x = torch.randn(16, 64), torch.randn(128, 64)
    w[:, 0] *= 8  # a large column the plain absmax scale wastes FP4's range on
    n, k = w.shape
    searched = search_channel_scales(w, 64, "e2m1", x, 101)
    plain = w.abs().amax(-1, keepdim=True)[:, :, None] / 6.0
    def out_err(scale):
        groups = w.reshape(n, 1, k)
        dq = (decode(encode(groups / scale, "e2m1"), "e2m1") * scale).reshape(n, k)
        return relative_error(x @ w.T, x @ dq.T)
    assert out_err(searched) < out_err(plain)


@pytest.mark.parametrize("options", [dict(fmt="e4m3"), dict(fmt="e2m1", group_size=32, act_fmt="e4m3")])
def test_pass_on_llama(options):
    zoo, gm = traced_zoo("tiny-llama")
    calibration = [{"input_ids": torch.randint(3, 256, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}]
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=calibration)
    q = run_pass(QuantizeFp(search_points=21, **options), gm, ctx)
    nodes = [n for n in q.graph.nodes if n.target == FP]
    assert len(nodes) == 14
    ref, got = run_graph(gm, ctx.example_inputs)[0], run_graph(q, ctx.example_inputs)[0]
    assert 0 < relative_error(ref, got) < (0.05 if options["fmt"] == "e4m3" else 0.3)


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="fmt"):
        QuantizeFp(fmt="e3m2")
