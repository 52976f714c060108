"""transformers' MoE grouped matmul (`transformers::grouped_mm_fallback`) lowers to ONNX: one
MatMul per expert over its rows, an expert with no rows and rows past the last offset (zeros)
included, equal to transformers' own kernel at two row counts."""
import pytest
import torch

pytest.importorskip("onnxruntime")
moe = pytest.importorskip("transformers.integrations.moe")

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx  # noqa: E402
from fxforge.ir.trace import trace  # noqa: E402

EXPERTS, IN, OUT = 3, 8, 5


class _Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(EXPERTS, IN, OUT, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, offs):
        return torch.ops.transformers.grouped_mm_fallback(x, self.weight, offs)


def test_grouped_mm_runs_in_onnx_runtime_as_transformers_computes_it(tmp_path):
    model = _Experts().eval()
    x = torch.randn(7, IN)
    gm = trace(model, (x, torch.tensor([3, 3, 6])))
    runner = OnnxRunner(export_onnx(gm, (x, torch.tensor([3, 3, 6])), tmp_path / "moe.onnx"), threads=1)
    # expert 1 takes no rows; in the second case the last row is past offs[-1] (zero in the reference)
    for rows, offs in [(7, [2, 2, 7]), (10, [4, 4, 9])]:
        x, offs = torch.randn(rows, IN), torch.tensor(offs)
        want = model(x, offs)
        torch.testing.assert_close(runner(x, offs)[0], want, atol=1e-5, rtol=1e-5)
    assert want[-1].abs().max() == 0  # the reference really left the untaken row zero
