"""A float32 model that computes one small tensor in bfloat16 (Falcon's ALiBi: bf16 slopes times
bf16 positions) exports to ONNX and runs in ONNX Runtime's CPU provider, which has no bfloat16
Mul: the node computes in float32 between casts, which rounds exactly as PyTorch's CPU kernel."""
import pytest
import torch

from fxforge.backends.onnx.backend import OnnxRunner, export_model, export_onnx
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import trace

pytest.importorskip("onnxruntime")


class _Bf16Bias(torch.nn.Module):
    """x + float32(bf16(slopes) * bf16(positions)): one bfloat16 Mul in a float32 graph."""

    def __init__(self):
        super().__init__()
        self.slopes = torch.nn.Parameter(torch.tensor([0.5, 0.25, 0.125, 0.0625]) * 1.37)

    def forward(self, x):
        positions = torch.arange(x.shape[-1]).to(torch.bfloat16)
        bias = self.slopes.to(torch.bfloat16)[:, None] * positions[None, :] / 3.0
        return x + bias.to(torch.float32)


@pytest.fixture(scope="module")
def graph():
    x = torch.randn(2, 4, 9)
    gm = trace(_Bf16Bias(), (x,))
    canonicalize(gm)
    return gm, x


def test_the_bfloat16_arithmetic_computes_in_float32_between_casts(graph):
    gm, x = graph
    model = export_model(gm, (x,))
    arithmetic = [n for n in model.graph.all_nodes() if n.op_type in ("Mul", "Div")]
    assert len(arithmetic) == 2
    import onnx_ir as ir
    for node in arithmetic:  # float32 in and out, each fed by and feeding a Cast
        assert node.outputs[0].dtype == ir.DataType.FLOAT
        assert all(v.dtype == ir.DataType.FLOAT for v in node.inputs)
        assert [u.op_type for u, _ in node.outputs[0].uses()] == ["Cast"]


def test_it_runs_in_onnx_runtime_and_matches_eager_bit_for_bit(graph, tmp_path):
    gm, x = graph
    runner = OnnxRunner(export_onnx(gm, (x,), tmp_path / "bias.onnx"), threads=1)
    for shape in [(2, 4, 9), (1, 4, 13)]:
        y = torch.randn(shape)
        torch.testing.assert_close(runner(y)[0], gm(y)[0], atol=0, rtol=0)
