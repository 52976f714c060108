"""Adapted models export to ONNX (adapter branches as MatMuls) and merged ones as plain linears."""
import onnx
import torch

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.base import PassContext, run_pass


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_unmerged_lora_exports_and_matches_eager(mlp, adapt, randomize, tmp_path):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, rank=4, targets=("fc1", "fc2"))
    randomize(out)
    path = export_onnx(out, zoo.args, tmp_path / "lora.onnx")
    assert _ops(path).count("MatMul") == 2 + 2 * 2  # x·Wᵀ of each adapted layer + two per adapter branch
    x = torch.randn(7, 32)  # another batch size: the batch axis stays dynamic
    got = OnnxRunner(path)(x)[0]
    torch.testing.assert_close(got, out(x)[0].detach(), atol=1e-5, rtol=1e-5)


def test_merged_model_exports_as_plain_linears_and_matches_unmerged(mlp, adapt, randomize, tmp_path):
    zoo, gm = mlp
    out = adapt(gm, zoo.args, rank=4, targets=("fc1", "fc2"))
    randomize(out)
    merged = run_pass(MergeAdapters(), out, PassContext(example_inputs=tuple(zoo.args)))
    path = export_onnx(merged, zoo.args, tmp_path / "merged.onnx")
    ops = _ops(path)
    assert ops.count("MatMul") + ops.count("Gemm") == 3  # the three base linears, nothing else
    x = torch.randn(5, 32)
    torch.testing.assert_close(OnnxRunner(path)(x)[0], out(x)[0].detach(), atol=1e-4, rtol=1e-4)
