"""quantize(method=easyquant): outliers kept exactly, optimized ranges beat RTN's weight error,
the linear_sparse op on eager and ONNX, and the pass on tiny-llama."""
import pytest
import torch
from testing_utils import traced_zoo

from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize import Quantize
from fxforge.passes.quantize.common import relative_error
from fxforge.passes.quantize.easyquant import quantize_weight_easyquant
from fxforge.passes.quantize.rtn import QuantSpec, quantize_weight_rtn

SPARSE = torch.ops.fxforge.linear_sparse.default


def _heavy_tailed(rows=32, cols=128):
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_beats_rtn_weight_error_and_keeps_outliers_exact(bits, sym):
    w = _heavy_tailed()
    spec = QuantSpec(bits, 32, sym)
    qm, outliers = quantize_weight_easyquant(w, spec, steps=50)
    restored = qm.dequantize()
    restored[outliers.rows, outliers.cols] += outliers.values
    assert 0 < outliers.values.numel() < 0.03 * w.numel()
    torch.testing.assert_close(restored[outliers.rows, outliers.cols], w[outliers.rows, outliers.cols])
    rtn = quantize_weight_rtn(w, spec).dequantize()
    assert relative_error(w, restored) < 0.8 * relative_error(w, rtn)


def test_linear_sparse_op_eager_and_onnx(tmp_path):
    import onnxruntime as ort

    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("indices", torch.tensor([[0, 3, 3, 5], [1, 0, 7, 7]]))
            self.register_buffer("values", torch.tensor([1.5, -2.0, 0.25, 4.0]))

        def forward(self, x):
            return torch.ops.fxforge.linear_sparse(x, self.indices, self.values, 6)

    module, x = Sparse(), torch.randn(2, 3, 8)
    dense = torch.zeros(6, 8)
    dense[0, 1], dense[3, 0], dense[3, 7], dense[5, 7] = 1.5, -2.0, 0.25, 4.0
    torch.testing.assert_close(module(x), x @ dense.T)
    program = torch.onnx.export(module, (x,), dynamo=True, custom_translation_table=translation_table(),
                                opset_version=OPSET_VERSION, optimize=False, verbose=False)
    program.save(str(tmp_path / "s.onnx"))
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), module(x))


def test_pass_on_llama_adds_sparse_outliers_and_beats_rtn():
    zoo, gm = traced_zoo("tiny-llama")
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()))
    # the layers only (the LM head, quantized by default, is most of a tiny model's weights)
    easy = run_pass(Quantize(bits=3, group_size=32, method="easyquant", range_steps=30, include_lm_head=False), gm, ctx)
    rtn = run_pass(Quantize(bits=3, group_size=32, include_lm_head=False), gm, ctx)
    ops = [n.target for n in easy.graph.nodes]
    assert ops.count(torch.ops.fxforge.linear_wq.default) == 14 and ops.count(SPARSE) == 14
    ref = run_graph(gm, ctx.example_inputs)[0]
    assert relative_error(ref, run_graph(easy, ctx.example_inputs)[0]) < relative_error(
        ref, run_graph(rtn, ctx.example_inputs)[0])
