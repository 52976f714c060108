"""fuse_rms_norm: structure, numerics and match count on Llama; no matches on GPT-2."""
import torch
from testing_utils import traced_zoo

from fxforge.ir.graph import summarize
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.fuse_rms_norm import FuseRmsNorm
from fxforge.ir.verify import run_graph


def test_fuses_every_rms_norm_in_llama():
    zoo, gm = traced_zoo("tiny-llama")
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()))
    assert summarize(gm).ops["aten.rsqrt"] == 5  # 2 layers x 2 norms + final norm
    fused = run_pass(FuseRmsNorm(), gm, ctx)
    ops = summarize(fused).ops
    assert ops["fxforge.rms_norm"] == 5
    assert ops["aten.rsqrt"] == 0 and ops["aten.pow"] == 0
    weights = [n.args[1].target for n in fused.graph.nodes if n.target == torch.ops.fxforge.rms_norm.default]
    assert "model.norm.weight" in weights
    for ref, got in zip(run_graph(gm, ctx.example_inputs), run_graph(fused, ctx.example_inputs)):
        assert torch.equal(ref, got)  # the op's reference computes the same float32 expression


def test_no_match_on_layer_norm_models():
    zoo, gm = traced_zoo("tiny-gpt2")
    result = FuseRmsNorm().run(gm, PassContext())
    assert result.sites == 0
