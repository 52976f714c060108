"""fxforge::linear_w8a8 exported to per-token int8 quantization + MatMulInteger, run by ORT.

The lowering reproduces the reference's quantization bit for bit (see its docstring for why
ORT's per-tensor DynamicQuantizeLinear/DynamicQuantizeMatMul were not used), so outputs are
compared at float32 rounding tolerance.
"""
import onnx
import pytest
import torch
from testing_utils import export_op_module, run_ort



class W8A8Linear(torch.nn.Module):
    def __init__(self, n, k, bias=True, dtype=torch.float32):
        super().__init__()
        self.eval()
        self.register_buffer("qweight", torch.randint(-127, 128, (n, k), dtype=torch.int8))
        self.register_buffer("wscale", torch.rand(n) * 0.01)
        self.bias = torch.nn.Parameter(torch.randn(n).to(dtype)) if bias else None

    def forward(self, x):
        return torch.ops.fxforge.linear_w8a8(x, self.qweight, self.wscale, self.bias)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float16, False)])
def test_matches_reference(tmp_path, dtype, bias):
    module = W8A8Linear(n=24, k=80, bias=bias, dtype=dtype)
    model, session = export_op_module(module, torch.randn(2, 3, 80, dtype=dtype), tmp_path / "m.onnx")
    assert "MatMulInteger" in {node.op_type for node in model.graph.node}
    # The weight is stored once, one byte an element (shifted to uint8, transposed): 1/4 of fp32.
    sizes = [onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer]
    assert max(sizes) == 24 * 80
    for batch in (2, 5):  # the second size exercises the dynamic batch dimension
        x = torch.randn(batch, 3, 80, dtype=dtype)
        x[0, 0] = 0  # an all-zero token takes the zero-scale guard
        x[1, 1, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5], dtype=dtype)  # ties round to even
        got, expected = run_ort(session, x), module(x)
        assert got.shape == (batch, 3, 24) and got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
