"""ir.depgraph: the coupling groups found on every zoo architecture equal the hand-derived ones,
GQA index maps are right, pruning any single group keeps the graph runnable, and couplings the
analysis cannot prove block their group with a reason."""
import copy

import networkx as nx
import pytest
import torch
from torch import nn

from fxforge.ir.depgraph import analyze, groups
from fxforge.ir.graph import finalize, get_attr
from fxforge.ir.trace import flatten_inputs, trace
from fxforge.ir.verify import run_graph
from fxforge.models import get_model
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.surgery import apply_pruning


def _trace(name):
    zm = get_model(name)
    gm = trace(zm.model, zm.args, zm.kwargs, dynamic_shapes=zm.dynamic_shapes)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    return zm, gm


@pytest.fixture(scope="module")
def llama():
    return _trace("tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return _trace("tiny-gpt2")


@pytest.fixture(scope="module")
def bert():
    return _trace("tiny-bert")


@pytest.fixture(scope="module")
def cnn():
    return _trace("cnn")


def _structure(found):
    """{(kind, units, frozenset((param, dim, per_unit)))} of the prunable groups."""
    return {(g.kind, g.units, frozenset((m.name, m.dim, m.per_unit) for m in g.members)) for g in found}


def _llama_expected():
    hidden = {("model.embed_tokens.weight", 1, 1), ("model.norm.weight", 0, 1), ("lm_head.weight", 1, 1)}
    out = set()
    for i in range(2):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        hidden |= {(a + f"{n}_proj.weight", 1, 1) for n in "qkv"} | {(a + "o_proj.weight", 0, 1)}
        hidden |= {(p + f"mlp.{n}_proj.weight", 1, 1) for n in ("gate", "up")}
        hidden |= {(p + "mlp.down_proj.weight", 0, 1), (p + "input_layernorm.weight", 0, 1),
                   (p + "post_attention_layernorm.weight", 0, 1)}
        # a key/value group: 2 query heads (32 rows of q, 32 columns of o) + 1 kv head (16 rows)
        out.add(("heads", 2, frozenset({(a + "q_proj.weight", 0, 32), (a + "k_proj.weight", 0, 16),
                                        (a + "v_proj.weight", 0, 16), (a + "o_proj.weight", 1, 32)})))
        # the i-th query head of every group: k/v untouched
        out.add(("query_heads", 2, frozenset({(a + "q_proj.weight", 0, 32), (a + "o_proj.weight", 1, 32)})))
        # v's head_dim (q/k's is sliced by RoPE, hence blocked): 1 of 16 in each head
        out.add(("head_dim", 16, frozenset({(a + "v_proj.weight", 0, 2), (a + "o_proj.weight", 1, 4)})))
        out.add(("channels", 128, frozenset({(p + "mlp.gate_proj.weight", 0, 1), (p + "mlp.up_proj.weight", 0, 1),
                                             (p + "mlp.down_proj.weight", 1, 1)})))
    out.add(("hidden", 64, frozenset(hidden)))
    return out


def test_llama_gqa_groups_equal_hand_derived(llama):
    _, gm = llama
    assert _structure(groups(gm)) == _llama_expected()


def test_llama_gqa_index_maps(llama):
    _, gm = llama
    found = {(g.kind, g.module_path.split(".")[2]): g for g in groups(gm)}
    kv = found[("heads", "0")]
    # kv group 1 owns query heads 2 and 3 (rows 32..63) and kv head 1 (rows 16..31)
    assert kv.member("model.layers.0.self_attn.q_proj.weight").slices(1) == list(range(32, 64))
    assert kv.member("model.layers.0.self_attn.k_proj.weight").slices(1) == list(range(16, 32))
    qh = found[("query_heads", "0")]
    # repeat index 1 = query head 1 of group 0 (rows 16..31) and head 3 of group 1 (rows 48..63)
    assert qh.member("model.layers.0.self_attn.q_proj.weight").slices(1) == list(range(16, 32)) + list(range(48, 64))
    hd = found[("head_dim", "0")]
    assert hd.member("model.layers.0.self_attn.o_proj.weight").slices(3) == [3, 19, 35, 51]


def test_llama_blocked_groups_say_why(llama):
    _, gm = llama
    blocked = [g for g in analyze(gm).groups if not g.prunable]
    reasons = " | ".join(g.blocked for g in blocked)
    assert "sliced by node" in reasons  # RoPE's rotate_half slices q/k head_dim
    assert "reaches the graph's outputs" in reasons  # the vocabulary
    assert all(g.blocked for g in blocked)


def test_gpt2_groups_equal_hand_derived(gpt2):
    _, gm = gpt2
    hidden = {("transformer.wpe.weight", 1, 1), ("transformer.ln_f.weight", 0, 1),
              ("transformer.ln_f.bias", 0, 1), ("lm_head.weight", 1, 1)}
    expected = set()
    for i in range(2):
        p = f"transformer.h.{i}."
        hidden |= {(p + n, 0, 1) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                           "attn.c_proj.weight", "attn.c_proj.bias",
                                           "mlp.c_proj.weight", "mlp.c_proj.bias")}
        hidden |= {(p + "attn.c_attn.weight", 1, 1), (p + "mlp.c_fc.weight", 1, 1)}
        c_attn = [(p + "attn.c_attn.weight", 0), (p + "attn.c_attn.bias", 0)]
        # a head: its 16 q, 16 k and 16 v rows of the fused c_attn, 16 columns of c_proj
        expected.add(("heads", 4, frozenset([(n, d, 48) for n, d in c_attn] + [(p + "attn.c_proj.weight", 1, 16)])))
        # q/k head_dim (no RoPE in GPT-2): 4 heads x (q, k) = 8 rows per unit
        expected.add(("head_dim", 16, frozenset((n, d, 8) for n, d in c_attn)))
        expected.add(("head_dim", 16, frozenset([(n, d, 4) for n, d in c_attn] + [(p + "attn.c_proj.weight", 1, 4)])))
        expected.add(("channels", 256, frozenset({(p + "mlp.c_fc.weight", 0, 1), (p + "mlp.c_fc.bias", 0, 1),
                                                  (p + "mlp.c_proj.weight", 1, 1)})))
    expected.add(("hidden", 64, frozenset(hidden)))
    assert _structure(groups(gm)) == expected


def test_gpt2_fused_qkv_head_rows(gpt2):
    _, gm = gpt2
    head = next(g for g in groups(gm) if g.kind == "heads" and "h.0." in g.module_path)
    rows = head.member("transformer.h.0.attn.c_attn.weight").slices(2)
    assert rows == list(range(32, 48)) + list(range(96, 112)) + list(range(160, 176))


def test_bert_groups_equal_hand_derived(bert):
    _, gm = bert
    expected = set()
    for i in range(2):
        a = f"encoder.layer.{i}.attention."
        qkv = [a + f"self.{n}.{t}" for n in ("query", "key", "value") for t in ("weight", "bias")]
        expected.add(("heads", 4, frozenset([(n, 0, 16) for n in qkv] + [(a + "output.dense.weight", 1, 16)])))
        expected.add(("head_dim", 16, frozenset((n, 0, 4) for n in qkv[:4])))
        expected.add(("head_dim", 16, frozenset([(n, 0, 4) for n in qkv[4:]] + [(a + "output.dense.weight", 1, 4)])))
        f = f"encoder.layer.{i}."
        expected.add(("channels", 128, frozenset({(f + "intermediate.dense.weight", 0, 1),
                                                  (f + "intermediate.dense.bias", 0, 1),
                                                  (f + "output.dense.weight", 1, 1)})))
    # the hidden size reaches the outputs (last_hidden_state): blocked, so not listed
    assert _structure(groups(gm)) == expected
    blocked = {g.kind: g.blocked for g in analyze(gm).groups if not g.prunable}
    assert "outputs" in blocked["hidden"]


def test_cnn_groups_equal_hand_derived(cnn):
    _, gm = cnn

    def conv_bn(prefix, dim_conv):
        bn = prefix[: -len("conv")] + "bn"  # "block1.conv2.conv" -> "block1.conv2.bn"
        return {(prefix + ".weight", dim_conv, 1)} | {
            (bn + "." + t, 0, 1) for t in ("weight", "bias", "running_mean", "running_var")}

    residual1 = conv_bn("stem.conv", 0) | conv_bn("block1.conv2.conv", 0) | {
        ("block1.conv1.conv.weight", 1, 1), ("block2.conv1.conv.weight", 1, 1),
        ("block2.shortcut.conv.weight", 1, 1)}
    inner1 = conv_bn("block1.conv1.conv", 0) | {("block1.conv2.conv.weight", 1, 1)}
    inner2 = conv_bn("block2.conv1.conv", 0) | {("block2.conv2.conv.weight", 1, 1)}
    residual2 = conv_bn("block2.conv2.conv", 0) | conv_bn("block2.shortcut.conv", 0) | {("head.weight", 1, 1)}
    found = {(g.units, frozenset((m.name, m.dim, m.per_unit) for m in g.members)) for g in groups(gm)}
    assert found == {(16, frozenset(residual1)), (16, frozenset(inner1)), (32, frozenset(inner2)),
                     (32, frozenset(residual2))}


def test_networkx_components_are_groups(llama):
    _, gm = llama
    analysis = analyze(gm)
    for g in analysis.groups:
        component = nx.node_connected_component(analysis.graph, next(
            n for n, data in analysis.graph.nodes(data=True) if data["axis"] == g.leaf))
        assert {analysis.graph.nodes[n]["axis"] for n in component} == {g.leaf}


@pytest.mark.parametrize("model", [pytest.param("llama", marks=pytest.mark.slow),
                                   pytest.param("gpt2", marks=pytest.mark.slow), "bert", "cnn"])
def test_pruning_any_single_group_keeps_graph_runnable(model, request):
    zm, gm = request.getfixturevalue(model)
    other_args, other_kwargs = zm.make_inputs(batch=3, seq=5) if model != "cnn" else zm.make_inputs(batch=3)
    for group in groups(gm):
        work = copy.deepcopy(gm)
        analysis = analyze(work)
        leaf_group = next(g for g in analysis.groups if g.leaf == group.leaf)
        before = {m.name: tuple(get_attr(work, m.name).shape) for m in leaf_group.members}
        apply_pruning(work, analysis, {leaf_group.leaf: {0}})
        finalize(work)
        for m in leaf_group.members:
            shape = list(before[m.name])
            shape[m.dim] -= m.per_unit
            assert tuple(get_attr(work, m.name).shape) == tuple(shape), (group.kind, m.name)
        for args, kwargs in ((zm.args, zm.kwargs), (other_args, other_kwargs)):
            flat = flatten_inputs(gm, args, kwargs)
            ref = run_graph(gm, flat)
            got = run_graph(work, flat)
            assert [r.shape for r in ref] == [o.shape for o in got], group.describe()
            assert all(torch.isfinite(o).all() for o in got)


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_unknown_op_blocks_its_groups_with_a_reason():
    gm = trace(_Cumsum(), (torch.randn(2, 8),), {}, dynamic_shapes=None)
    found = analyze(gm).groups
    hidden = next(g for g in found if g.units == 16)
    assert not hidden.prunable and "cumsum" in hidden.blocked and "not known" in hidden.blocked
    assert groups(gm) == []
