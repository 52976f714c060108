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


class NormThenProject(torch.nn.Module):
    """Hugging Face's LlamaRMSNorm feeding a linear: the six-node spelling with its casts."""

    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(8, eps=1e-6)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(self.norm(x))


def test_rms_norm_spelling_becomes_one_op():
    from graph_text import assert_graph

    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace

    x = torch.randn(2, 3, 8)
    gm = trace(NormThenProject().eval(), (x,), {}, dynamic_shapes=None)
    canonicalize(gm)
    assert_graph(gm, """
        x = input()
        to = aten.to.dtype(x, torch.float32)
        pow_1 = aten.pow.Tensor_Scalar(to, 2)
        mean = aten.mean.dim(pow_1, [-1], True)
        add = aten.add.Tensor(mean, 1e-06)
        rsqrt = aten.rsqrt(add)
        mul = aten.mul.Tensor(to, rsqrt)
        to_1 = aten.to.dtype(mul, torch.float32)
        mul_1 = aten.mul.Tensor(@norm.weight, to_1)
        linear = aten.linear(mul_1, @proj.weight, @proj.bias)
        return (linear,)
    """)
    fused = run_pass(FuseRmsNorm(), gm, PassContext(example_inputs=(x,)))
    assert_graph(fused, """
        x = input()
        rms_norm_default = fxforge.rms_norm(x, @norm.weight, 1e-06)
        linear = aten.linear(rms_norm_default, @proj.weight, @proj.bias)
        return (linear,)
    """)
