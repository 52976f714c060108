"""quantize_dynamic (W8A8) and llm_int8: the linear_int8_mixed op against its definition and in
ONNX Runtime, and both passes' structure, numerics and match counts on tiny-llama."""
import pytest
import torch
import torch.nn.functional as F

from fxforge.ir.graph import get_attr
from fxforge.ir.verify import run_graph
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize.common import relative_error
from fxforge.passes.quantize.llm_int8 import LlmInt8
from fxforge.passes.quantize.quantize_dynamic import QuantizeDynamic, quantize_weight_int8

W8A8 = torch.ops.fxforge.linear_w8a8.default
MIXED = torch.ops.fxforge.linear_int8_mixed.default


def _inputs_with_outliers(k=64):
    x = torch.randn(2, 5, k)
    x[0, 1, 3] = 40.0  # LLM.int8's systematic outlier features: a few large columns
    x[1, 4, 17] = -25.0
    return x


def test_int8_weight_quantizer():
    w = torch.randn(8, 32)
    w[3] = 0.0
    codes, scale = quantize_weight_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and scale[3] == 1.0
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_mixed_op_keeps_outlier_columns_in_float():
    x, w, b = _inputs_with_outliers(), torch.randn(24, 64) * 0.1, torch.randn(24)
    codes, scale = quantize_weight_int8(w)
    mixed = torch.ops.fxforge.linear_int8_mixed(x, codes, scale, b, 6.0)
    # definition, spelled out: regular columns through per-token int8, outliers in float
    outliers = torch.zeros(64, dtype=torch.bool)
    outliers[[3, 17]] = True
    regular = x.masked_fill(outliers, 0.0)
    x_scale = regular.abs().amax(-1, keepdim=True) / 127
    x8 = torch.round(regular / x_scale)
    expected = (x8 @ codes.double().T.float()) * x_scale * scale + (x * outliers) @ (codes * scale[:, None]).T + b
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-4)
    reference = F.linear(x, w, b)
    w8a8 = torch.ops.fxforge.linear_w8a8(x, codes, scale, b, "token")  # the same per-token quantizer
    assert relative_error(reference, mixed) < 0.6 * relative_error(reference, w8a8)
    # no column above the threshold: exactly W8A8
    torch.testing.assert_close(torch.ops.fxforge.linear_int8_mixed(x, codes, scale, b, 1e6), w8a8)


def test_mixed_op_onnx_lowering_matches_reference(tmp_path):
    import onnxruntime as ort

    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            codes, scale = quantize_weight_int8(torch.randn(24, 64) * 0.1)
            self.register_buffer("qweight", codes)
            self.register_buffer("wscale", scale)
            self.bias = torch.nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.ops.fxforge.linear_int8_mixed(x, self.qweight, self.wscale, self.bias, 6.0)

    module, x = Mixed(), _inputs_with_outliers()
    program = torch.onnx.export(module, (x,), dynamo=True, custom_translation_table=translation_table(),
                                opset_version=OPSET_VERSION, optimize=False, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch_input in (x, torch.randn(3, 5, 64)):  # with and without outlier columns
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch_input.numpy()})[0])
        torch.testing.assert_close(got, module(batch_input), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pass_,target", [(QuantizeDynamic(), W8A8), (LlmInt8(), MIXED)])
def test_pass_on_llama(llama, pass_, target):
    gm, ctx = llama
    q = run_pass(pass_, gm, ctx)  # verified within the pass's 5% relative-error bound
    nodes = [n for n in q.graph.nodes if n.target == target]
    assert len(nodes) == 14
    qweight = get_attr(q, nodes[0].args[1].target)
    assert qweight.dtype == torch.int8 and qweight.shape == (64, 64)
    ref, got = run_graph(gm, ctx.example_inputs)[0], run_graph(q, ctx.example_inputs)[0]
    assert 0 < relative_error(ref, got) < 0.03
    if target == MIXED:
        assert nodes[0].args[4] == 6.0


def test_llm_int8_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        LlmInt8(threshold=0.0)


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
def test_quantize_dynamic_act_scale_reaches_every_node(llama, act_scale):
    gm, ctx = llama
    q = run_pass(QuantizeDynamic(act_scale=act_scale), gm, ctx)
    nodes = [n for n in q.graph.nodes if n.target == W8A8]
    assert len(nodes) == 14 and {n.args[4] for n in nodes} == {act_scale}
    ref, got = run_graph(gm, ctx.example_inputs)[0], run_graph(q, ctx.example_inputs)[0]
    assert 0 < relative_error(ref, got) < 0.03


def test_quantize_dynamic_rejects_bad_act_scale():
    with pytest.raises(ValueError, match="act_scale must be one of"):
        QuantizeDynamic(act_scale="row")
