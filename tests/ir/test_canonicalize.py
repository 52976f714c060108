"""Canonicalization: one linear form, no dropout, exact outputs."""
import torch
from testing_utils import traced_zoo

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import linear_sites, summarize
from fxforge.ir.trace import trace

aten = torch.ops.aten


def ops(gm):
    return summarize(gm).ops


def test_gpt2_conv1d_addmm_becomes_linear():
    zoo, raw = traced_zoo("tiny-gpt2", canonical=False)
    assert ops(raw)["aten.addmm"] == 8  # 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj)
    gm = traced_zoo("tiny-gpt2")[1]
    assert ops(gm)["aten.addmm"] == 0
    sites = linear_sites(gm)
    assert len(sites) == 8
    c_attn = next(s for s in sites if s.module_path == "transformer.h.0.attn.c_attn")
    # Conv1D stores (in, out); canonical form is (out, in)
    assert (c_attn.out_features, c_attn.in_features) == (3 * 64, 64)
    conv1d_weight = zoo.model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(gm.get_parameter(c_attn.weight_name), conv1d_weight.t())


def test_dropout_and_asserts_removed():
    _, raw = traced_zoo("tiny-gpt2", canonical=False)
    assert ops(raw)["aten.dropout"] > 0
    gm = traced_zoo("tiny-gpt2")[1]
    assert ops(gm)["aten.dropout"] == 0
    assert ops(gm)["aten._assert_tensor_metadata"] == 0


class MatmulWithParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in_out = torch.nn.Parameter(torch.randn(8, 4))   # used as x @ W
        self.w_out_in = torch.nn.Parameter(torch.randn(5, 4))   # used as x @ W.T
        self.bias = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        a = torch.matmul(x, self.w_in_out)
        b = torch.addmm(self.bias, x.reshape(-1, 8)[:, :4], self.w_out_in.t())
        return a, b


def test_matmul_and_addmm_before_and_after():
    """x @ W (an (in, out) parameter) and addmm(b, x, Wᵀ) both become aten.linear with an
    (out, in) weight; the W.t() node goes, and W is stored transposed in place."""
    from graph_text import assert_graph

    gm = trace(MatmulWithParameter(), (torch.randn(3, 8),), dynamic_shapes=None)
    assert_graph(gm, """
        x = input()
        matmul = aten.matmul(x, @w_in_out)
        reshape = aten.reshape(x, [-1, 8])
        slice_1 = aten.slice.Tensor(reshape, 1, 0, 4)
        t = aten.t(@w_out_in)
        addmm = aten.addmm(@bias, slice_1, t)
        return (matmul, addmm)
    """)
    canonicalize(gm)
    assert_graph(gm, """
        x = input()
        linear_default = aten.linear(x, @w_in_out, None)
        reshape = aten.reshape(x, [-1, 8])
        slice_1 = aten.slice.Tensor(reshape, 1, 0, 4)
        linear_default_1 = aten.linear(slice_1, @w_out_in, @bias)
        return (linear_default, linear_default_1)
    """)
    assert gm.w_in_out.shape == (4, 8)


def test_matmul_and_mm_with_parameters_become_linear():
    model = MatmulWithParameter()
    x = torch.randn(3, 8)
    gm = trace(model, (x,))
    rewrites = canonicalize(gm)
    assert rewrites >= 2
    assert ops(gm)["aten.linear"] == 2
    assert ops(gm)["aten.matmul"] == 0 and ops(gm)["aten.addmm"] == 0
    expected = model(x)
    got = gm(x)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-6)
    weights = {s.weight_name: (s.out_features, s.in_features) for s in linear_sites(gm)}
    assert weights["w_in_out"] == (4, 8)


def test_metadata_valid_after_canonicalize():
    gm = traced_zoo("tiny-gpt2")[1]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            val = node.meta["val"]
            weight = gm.get_parameter(node.args[1].target)
            assert val.shape[-1] == weight.shape[0]


class PositionBiasedScores(torch.nn.Module):
    """ALiBi-style scores as Bloom computes them: bias.baddbmm(q, kᵀ, beta, alpha)."""

    def __init__(self, beta: float, alpha: float):
        super().__init__()
        self.beta, self.alpha = beta, alpha

    def forward(self, q, k, bias):
        return bias.baddbmm(q, k.transpose(1, 2), beta=self.beta, alpha=self.alpha)


def test_baddbmm_with_dynamic_sizes_becomes_bmm_plus_bias():
    # The baddbmm kernel wants concrete sizes: fake propagation of a dynamic-length trace failed.
    q, k, bias = torch.randn(6, 5, 8), torch.randn(6, 5, 8), torch.randn(6, 1, 5)
    for beta, alpha, expected in [(1.0, 0.25, ["aten.bmm", "aten.mul", "aten.add"]),
                                  (0.5, 1.0, ["aten.bmm", "aten.mul", "aten.add"]),
                                  (0.0, 0.25, ["aten.bmm", "aten.mul"])]:
        model = PositionBiasedScores(beta, alpha)
        gm = trace(model, (q, k, bias))
        assert canonicalize(gm) >= 1
        counts = ops(gm)
        assert counts["aten.baddbmm"] == 0 and all(counts[name] >= 1 for name in expected)
        for length in (5, 9):  # the trace length and another
            q, k, bias = torch.randn(6, length, 8), torch.randn(6, length, 8), torch.randn(6, 1, length)
            torch.testing.assert_close(gm(q, k, bias)[0], model(q, k, bias), atol=1e-6, rtol=1e-6)
