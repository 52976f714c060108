"""Adapted models export to ONNX (adapter branches as MatMuls) and merged ones as plain linears.

One small model with a different method on each of its seven layers covers every adapter op
(lora_linear, dora_linear, miss_linear, bone_linear) and every composed factor (LoRA-SB's R·A,
SORSA's diag(S)·A, LoLDU's diag(c·z)·U) in a single export: exports are the slow part.
"""
import onnx
import pytest
import torch
from torch import nn

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import summarize
from fxforge.ir.trace import trace
from fxforge.passes.adapters.merge_adapters import MergeAdapters
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

pytestmark = pytest.mark.slow  # two ONNX exports of a seven-layer model: ~30 s on 2 busy cores

PLAN = [("l0", "lora", {}), ("l1", "dora", {}), ("l2", "bone", {"bone_form": "bat"}), ("l3", "bone", {}),
        ("l4", "lora_sb", {}), ("l5", "sorsa", {}), ("l6", "loldu", {})]


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(24, 24, bias=i % 2 == 0) for i in range(len(PLAN)))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)
    x = torch.randn(4, 24)
    gm = trace(Stack().eval(), (x,))
    canonicalize(gm)
    ctx = PassContext(example_inputs=(x,))
    from fxforge.passes.adapters.add_adapters import AddAdapters

    for layer, method, options in PLAN:
        index = layer[1:]
        gm = run_pass(AddAdapters(method=method, rank=4, targets=(f"layers.{index}",), **options), gm, ctx)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move off the init, where several adapters are exactly zero
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return gm, x


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_every_adapter_op_exports_and_matches_eager(adapted, tmp_path):
    gm, x = adapted
    ops = summarize(gm).ops
    assert (ops["fxforge.lora_linear"], ops["fxforge.dora_linear"], ops["fxforge.bone_linear"],
            ops["fxforge.miss_linear"]) == (4, 1, 1, 1)
    path = export_onnx(gm, (x,), tmp_path / "adapted.onnx")
    other = torch.randn(9, 24)  # another batch size: the batch axis stays dynamic
    torch.testing.assert_close(OnnxRunner(path)(other)[0], gm(other)[0].detach(), atol=1e-5, rtol=1e-5)


def test_merged_model_exports_as_plain_linears_and_matches_unmerged(adapted, tmp_path):
    gm, x = adapted
    merged = run_pass(MergeAdapters(), gm, PassContext(example_inputs=(x,)))
    path = export_onnx(merged, (x,), tmp_path / "merged.onnx")
    ops = _ops(path)
    assert ops.count("MatMul") + ops.count("Gemm") == len(PLAN)  # one per layer, no adapter branch left
    other = torch.randn(5, 24)
    torch.testing.assert_close(OnnxRunner(path)(other)[0], gm(other)[0].detach(), atol=1e-4, rtol=1e-4)
