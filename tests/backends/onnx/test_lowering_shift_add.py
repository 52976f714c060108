"""fxforge::shift_add_linear exported to standard ONNX ops and run by ONNX Runtime, against the reference."""
import onnx
import onnxruntime as ort
import pytest
import torch
from testing_utils import export_op_module, run_ort

import fxforge
from fxforge.ir.ops.shift_add_linear import pack_signs, round_to_apot
from fxforge.ir.trace import flatten_inputs
from fxforge.ir.verify import run_graph
from fxforge.models import get_model


class ShiftAddLinear(torch.nn.Module):
    def __init__(self, n, k, q, group_size, terms=3, bias=True, dtype=torch.float32):
        super().__init__()
        planes = (torch.randint(0, 2, (q, n, k)) * 2 - 1).to(torch.int8)
        exps, signs = round_to_apot(torch.rand(n, k // group_size, q) * 0.2 + 0.01, terms)
        self.register_buffer("packed", pack_signs(planes))
        self.register_buffer("exps", exps)
        self.register_buffer("signs", signs)
        self.bias = torch.nn.Parameter(torch.randn(n).to(dtype)) if bias else None
        self.group_size = group_size

    def forward(self, x):
        return torch.ops.fxforge.shift_add_linear(x, self.packed, self.exps, self.signs, self.bias, self.group_size)


# K=40 leaves padding bits in the last int32 word; K=96 spans three full words.
@pytest.mark.parametrize("k,q,group_size,dtype,bias", [
    (96, 3, 32, torch.float32, True),
    (40, 2, 8, torch.float32, False),
    (64, 4, 64, torch.float16, True),
])
def test_matches_reference(tmp_path, k, q, group_size, dtype, bias):
    module = ShiftAddLinear(n=24, k=k, q=q, group_size=group_size, bias=bias, dtype=dtype)
    model, session = export_op_module(module, torch.randn(2, 3, k, dtype=dtype), tmp_path / "m.onnx")
    op_types = {nd.op_type for nd in model.graph.node}
    assert "MatMul" in op_types and all(nd.domain in ("", "ai.onnx") for nd in model.graph.node)
    for batch in (2, 5):  # the second size exercises the dynamic batch dimension
        x = torch.randn(batch, 3, k, dtype=dtype)
        got, expected = run_ort(session, x), module(x)
        assert got.shape == (batch, 3, 24) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


def test_file_stores_the_packed_form(tmp_path):
    n, k, q = 64, 256, 2
    model, _ = export_op_module(ShiftAddLinear(n=n, k=k, q=q, group_size=128, bias=False), torch.randn(1, k), tmp_path / "m.onnx")
    sizes = {init.name: onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer}
    # packed signs are q bits per weight; exponents and term signs are tiny; no float weight is stored
    assert n * k * q // 8 in sizes.values()
    assert sum(sizes.values()) < n * k * 4 / 10
    # ORT folds the whole rebuild into a float weight at session start: one Gemm is left to run
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    assert [nd.op_type for nd in onnx.load(options.optimized_model_filepath).graph.node] in (["Gemm"], ["MatMul"])


def test_shift_add_model_compiles_to_onnx_and_matches_eager(tmp_path):
    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, passes="shift_add(bits=3,group_size=-1,iters=2)",
                               backend="onnx", backend_options={"path": str(tmp_path / "mlp.onnx")})
    assert compiled.report["shift_add"].sites == 3  # the MLP has no LM head: all three linears
    model = onnx.load(str(tmp_path / "mlp.onnx"))
    assert sum(nd.op_type == "BitwiseAnd" for nd in model.graph.node) == 3
    args, kwargs = zoo.make_inputs(batch=5)
    flat = flatten_inputs(compiled.graph_module, args, kwargs)
    got = compiled.run_flat(*flat)
    expected = run_graph(compiled.graph_module, flat)  # the rewritten graph, run by the reference ops
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
