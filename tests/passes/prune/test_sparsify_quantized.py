"""`quantize,sparsify`: sparsify masks the codes of fxforge::linear_wq layers (prune/quantized.py):
a pruned weight's code becomes its group's zero point (dequantizes to exactly 0), kept codes are
untouched, the layer stays one linear_wq, and the pipeline verifies F.linear(x, ŵ·mask, b)."""
import pytest
import torch
from testing_utils import traced_zoo

from fxforge.ir.graph import get_attr, summarize
from fxforge.ir.ops.linear_wq import dequantize_wq, unpack_bits
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline

WQ = torch.ops.fxforge.linear_wq.default


@pytest.fixture(scope="module")
def mlp():
    """(zoo, canonical graph) of the zoo MLP (fc1 32->64, fc2 64->64, fc3 64->10)."""
    return traced_zoo("mlp")


def _codes_and_weights(gm):
    out = {}
    for node in gm.graph.nodes:
        if node.target == WQ:
            _, q, s, z, _, bits, g = node.args
            k = int(node.args[0].meta["val"].shape[-1])
            packed, scales, zeros = get_attr(gm, q.target), get_attr(gm, s.target), get_attr(gm, z.target)
            out[node.meta["module_path"]] = (unpack_bits(packed, bits, k), zeros.repeat_interleave(g, 1)[:, :k],
                                             dequantize_wq(packed, scales, zeros, bits, g, k))
    return out


def test_sparsify_after_quantize_masks_the_codes(mlp):
    zoo, gm = mlp
    ctx = PassContext(example_inputs=tuple(zoo.args))
    quantized, _ = Pipeline("quantize(group_size=16)").run(gm, ctx)
    sparse, report = Pipeline("sparsify(method=magnitude,sparsity=0.5,targets=[fc1,fc2])").run(quantized, ctx)
    record = report["sparsify"]
    assert record.sites == 2 and record.skipped == []  # match count: fc1, fc2
    assert record.verified_against == "semantics" and record.check_error <= 1e-5
    assert summarize(sparse).ops["fxforge.linear_wq"] == 3 and summarize(sparse).ops.get("aten.linear", 0) == 0
    before, after = _codes_and_weights(quantized), _codes_and_weights(sparse)
    for path in ("fc1", "fc2"):
        codes0, _, w0 = before[path]
        codes1, zeros, w1 = after[path]
        pruned = w1 == 0
        assert 0.45 <= pruned.float().mean().item() <= 0.6  # half, plus weights that were 0 already
        assert torch.equal(codes1[pruned], zeros[pruned].to(codes1.dtype))  # pruned: the zero point
        assert torch.equal(codes1[~pruned], codes0[~pruned])  # kept: untouched
        kept = w0.abs() > w0.abs().flatten().kthvalue(int(0.5 * w0.numel())).values
        assert torch.equal(w1[kept], w0[kept])  # magnitude kept the largest dequantized weights
    codes0, _, _ = before["fc3"]
    assert torch.equal(after["fc3"][0], codes0)  # not targeted


def test_sparsify_after_quantize_runs_on_onnx(mlp):
    import fxforge

    zoo, _ = mlp
    compiled = fxforge.compile(zoo.model, zoo.args, passes="quantize(group_size=16),sparsify(method=magnitude)",
                               backend="onnx")
    assert compiled.report["sparsify"].sites == 3
    assert compiled.report.backend_check.ok
