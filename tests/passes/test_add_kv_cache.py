"""Pass add_kv_cache: cached graph structure, cached == uncached logits, positions, tree mask, errors."""
import copy

import pytest
import torch
from torch import nn

from fxforge.errors import PassError
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.ops import get_op
from fxforge.ir.trace import trace
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.meta_keys import KV_META
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass
from runtime.fused_code_lm import fused_graph

aten = torch.ops.aten


def _cached(fused: bool):
    gm, ids = fused_graph(fused=fused)
    ids = ids[:, :10]
    cached = run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)))
    return gm, cached, ids


@pytest.fixture(scope="module", params=["fused", "eager"])
def graphs(request):
    """(uncached graph, cached graph, example ids) for the tiny code-lm, with its attention fused
    (the cache goes into fxforge::attention) or as the model wrote it (the eager path)."""
    return _cached(fused=request.param == "fused")


@pytest.fixture(scope="module")
def fused_graphs():
    """`graphs` with fused attention only, for tests of the fused graph's structure."""
    return _cached(fused=True)


def _run(cached, ids, past_len, past, positions=None, mask=None):
    out = cached(*cached_inputs(cached.meta[KV_META], ids, past_len, past, positions, mask))
    meta = cached.meta[KV_META]
    return out[0], [out[i] for pair in meta.present for i in pair]


def _fuse_and_cache(model, ids):
    """(cached graph, pipeline report) of `fuse_attention,add_kv_cache` on a hand-written model."""
    gm = trace(model, (ids,))
    canonicalize(gm)
    return Pipeline("fuse_attention,add_kv_cache").run(gm, PassContext(example_inputs=(ids,)))


def _assert_prefill_then_step_matches(cached, model, ids):
    """A prefill of 4 tokens then one cached step over the rest gives the model's own logits."""
    logits, past = _run(cached, ids[:, :4], 0, empty_past(cached.meta[KV_META], ids.shape[0], torch.float32))
    step, _ = _run(cached, ids[:, 4:], 4, past)
    torch.testing.assert_close(torch.cat([logits, step], 1), model(ids), atol=1e-5, rtol=1e-5)


def test_structure_inputs_outputs_and_attention_arguments(fused_graphs):
    gm, cached, _ = fused_graphs
    names = [n.name for n in cached.graph.nodes if n.op == "placeholder"]
    assert names == ["input_ids", "position_ids", "tree_mask", "past_key_0", "past_value_0",
                     "past_key_1", "past_value_1"]
    attention = get_op("attention").overload
    attn = [n for n in cached.graph.nodes if n.target == attention]
    assert len(attn) == 2
    placeholders = {n.name: n for n in cached.graph.nodes if n.op == "placeholder"}
    for i, node in enumerate(attn):
        q, k, v, mask, causal, scale, groups = node.args
        assert k.target == aten.cat.default and k.args[0][0] is placeholders[f"past_key_{i}"]
        assert v.target == aten.cat.default and v.args[0][0] is placeholders[f"past_value_{i}"]
        assert mask is placeholders["tree_mask"] and causal is True
        assert groups == 2  # GQA: 4 query heads share 2 cached key/value heads
    outputs = cached.graph.output_node().args[0]
    assert len(outputs) == 1 + 4 and [o.target for o in outputs[1:]] == [aten.cat.default] * 4
    assert not any(n.target in (aten.arange.default, aten.arange.start) for n in cached.graph.nodes)
    meta = cached.meta[KV_META]
    assert meta.kv_shapes == ((2, 16, 16), (2, 16, 16))
    assert meta.past == ((3, 4), (5, 6)) and meta.present == ((1, 2), (3, 4))


def test_token_by_token_decoding_matches_the_uncached_graph(graphs):
    gm, cached, ids = graphs
    ref = gm(ids)[0]
    logits, past = _run(cached, ids[:, :3], 0, empty_past(cached.meta[KV_META], 2, torch.float32))
    steps = [logits]
    for t in range(3, ids.shape[1]):
        logits, past = _run(cached, ids[:, t:t + 1], t, past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-4, rtol=1e-4)
    assert past[0].shape == (2, 2, ids.shape[1], 16)


def test_rotary_reads_the_position_ids_input(graphs):
    _, cached, ids = graphs
    empty = empty_past(cached.meta[KV_META], 2, torch.float32)
    base, _ = _run(cached, ids, 0, empty)
    # rotary attention depends on relative positions only: a constant shift changes nothing ...
    shifted, _ = _run(cached, ids, 0, empty, positions=torch.arange(7, 17).expand(2, 10))
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    # ... but other relative positions do, so the input is really read
    spread, _ = _run(cached, ids, 0, empty, positions=(torch.arange(10) * 3).expand(2, 10))
    assert (spread - base).abs().max() > 1e-2


def test_tree_mask_gives_each_branch_the_logits_of_its_own_sequence(graphs):
    gm, cached, ids = graphs
    prefix, a, b, c = ids[:1, :6], ids[0, 6], ids[0, 7], ids[0, 8]
    _, past = _run(cached, prefix, 0, empty_past(cached.meta[KV_META], 1, torch.float32))
    # tree: a at depth 1; b and c both children of a (siblings at depth 2)
    tree = torch.tensor([[a, b, c]])
    positions = torch.tensor([[6, 7, 7]])
    visible = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    mask = torch.cat([torch.ones(3, 6, dtype=torch.bool), visible], dim=1)[None, None]
    logits, present = _run(cached, tree, 6, past, positions, mask)
    for node, seq in ((1, [a, b]), (2, [a, c])):
        full = torch.cat([prefix, torch.tensor([seq])], dim=1)
        ref = gm(full)[0][0, -1]
        torch.testing.assert_close(logits[0, node], ref, atol=1e-4, rtol=1e-4)
    assert present[0].shape[2] == 6 + 3


def test_eager_attention_structure():
    """Unfused attention keeps its ops: the cache enters before repeat_kv, the tree mask replaces
    the causal mask, and the GQA expand/reshape sizes follow the cached length."""
    gm, ids = fused_graph(fused=False)
    result = Pipeline("add_kv_cache").run(gm, PassContext(example_inputs=(ids[:, :10],)))
    cached, report = result
    assert report.records[0].sites == 2 and report.records[0].notes["attention"] == "eager"
    assert not any(n.target == get_op("attention").overload for n in cached.graph.nodes)
    placeholders = {n.name: n for n in cached.graph.nodes if n.op == "placeholder"}
    cats = [n for n in cached.graph.nodes if n.target == aten.cat.default
            and n.args[0][0].name.startswith("past_")]
    assert [c.args[0][0].name for c in cats] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    # cached heads are the 2 kv heads; the repetition to 4 query heads comes after the cache and
    # its expand sizes read the cached length
    expands = [n for n in cached.graph.nodes if n.target == aten.expand.default]
    assert len(expands) == 4
    for expand in expands:
        length = expand.args[1][3]
        assert length.target == aten.sym_size.int and length.args[0] in cats
    softmaxes = [n for n in cached.graph.nodes if n.target == aten.softmax.int]
    for softmax in softmaxes:
        mask_add = softmax.args[0]
        assert mask_add.target == aten.add.Tensor
        fill = mask_add.args[1]
        assert fill.target == aten.masked_fill.Scalar
        assert placeholders["tree_mask"] in fill.args[1].all_input_nodes
    assert cached.meta[KV_META].kv_shapes == ((2, 16, 16), (2, 16, 16))


def test_verify_compares_cached_with_uncached(graphs):
    gm, cached, ids = graphs
    ctx = PassContext(example_inputs=(ids,))
    assert AddKvCache().verify(gm, cached, ctx).ok
    broken = copy.deepcopy(cached)
    for node in broken.graph.nodes:  # new keys before the past ones: the masks see the wrong keys
        if node.target == aten.cat.default and node.args[0][0].name.startswith("past_"):
            node.args = (node.args[0][::-1], 2)
    broken.recompile()
    assert not AddKvCache().verify(gm, broken, ctx).ok


class _PlainAttentionLM(nn.Module):
    """An LM with fused attention and no positional information at all (hand-written)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids, pad_mask=None):
        q, k, v = self.qkv(self.embed(ids)).unsqueeze(1).chunk(3, dim=-1)
        mask = None if pad_mask is None else pad_mask[:, None, None, :].bool()
        out = torch.ops.fxforge.attention(q, k, v, mask, True, None, 1)
        return self.lm_head(out[:, 0])


class _EagerAttentionLM(nn.Module):
    """Hand-written eager attention with a tanh soft-cap (which fuse_attention cannot prove)."""

    # causal: True (a tril mask), False (no mask), "all" (a mask that hides nothing, as BERT's)
    def __init__(self, vocab: int = 32, dim: int = 16, causal: bool | str = True):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.lm_head(self.attend(self.embed(ids), self.qkv, soft_cap=True))

    def attend(self, x, qkv, soft_cap):
        q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / 4.0
        if soft_cap:
            scores = torch.tanh(scores) * 4.0
        if self.causal:
            n = x.shape[1]
            visible = torch.ones(n, n, dtype=torch.bool, device=x.device)
            visible = visible if self.causal == "all" else visible.tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        return x + (scores.softmax(-1) @ v)[:, 0]


class _MixedAttentionLM(_EagerAttentionLM):
    """Layer 1 plain causal attention (fusable), layer 2 soft-capped (stays eager)."""

    def __init__(self):
        super().__init__()
        self.qkv2 = nn.Linear(16, 48)

    def forward(self, ids):
        x = self.attend(self.embed(ids), self.qkv, soft_cap=False)
        return self.lm_head(self.attend(x, self.qkv2, soft_cap=True))


def test_soft_capped_attention_is_cached_on_the_eager_path():
    model = _EagerAttentionLM()
    ids = torch.randint(0, 32, (2, 7))
    cached, report = _fuse_and_cache(model, ids)
    assert report.records[0].sites == 0 and report.records[0].skipped  # the soft-cap is not fusable
    assert report.records[1].sites == 1 and report.records[1].notes["attention"] == "eager"
    _assert_prefill_then_step_matches(cached, model, ids)


def test_fused_and_unfused_layers_in_one_graph_are_all_cached_in_layer_order():
    model = _MixedAttentionLM()
    ids = torch.randint(0, 32, (2, 7))
    cached, report = _fuse_and_cache(model, ids)
    assert report.records[0].sites == 1 and len(report.records[0].skipped) == 1
    assert report.records[1].sites == 2 and report.records[1].notes["attention"] == "mixed"
    attention = [n for n in cached.graph.nodes if n.target == get_op("attention").overload]
    assert attention[0].args[1].args[0][0].name == "past_key_0"  # the fused layer comes first
    _assert_prefill_then_step_matches(cached, model, ids)


def test_model_without_positions_is_cached_too():
    model = _PlainAttentionLM()
    ids = torch.randint(0, 32, (2, 6))
    gm = trace(model, (ids,))
    canonicalize(gm)
    result_gm = run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)))
    _assert_prefill_then_step_matches(result_gm, model, ids)


def test_errors_name_the_problem_and_the_fix(fused_graphs):
    model = _PlainAttentionLM()
    ids = torch.randint(0, 32, (2, 6))
    padded = trace(model, (ids, torch.ones(2, 6)))
    with pytest.raises(PassError, match="token ids alone"):
        run_pass(AddKvCache(), padded, PassContext(example_inputs=(ids, torch.ones(2, 6))))
    no_attention = trace(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)), (ids % 8,))
    with pytest.raises(PassError, match="found no attention to cache.*softmax"):
        run_pass(AddKvCache(), no_attention, PassContext(example_inputs=(ids % 8,)))
    bidirectional = trace(_EagerAttentionLM(causal=False), (ids,))
    with pytest.raises(PassError, match="has no mask, so it is not causal"):
        run_pass(AddKvCache(), bidirectional, PassContext(example_inputs=(ids,)))
    all_visible = trace(_EagerAttentionLM(causal="all"), (ids,))  # a mask, but one that hides no key
    with pytest.raises(PassError, match="is not causal \\(the mask hides no key"):
        run_pass(AddKvCache(), all_visible, PassContext(example_inputs=(ids,)))
    _, cached, ids = fused_graphs
    with pytest.raises(PassError, match="already has a KV cache"):
        run_pass(AddKvCache(), cached, PassContext())


def test_later_passes_verify_on_the_inputs_the_cached_graph_takes(graphs):
    gm, _, ids = graphs
    ctx = PassContext(example_inputs=(ids,))
    cached, report = Pipeline("add_kv_cache,quantize(bits=8,group_size=-1)").run(gm, ctx)
    meta = cached.meta[KV_META]
    assert len(ctx.example_inputs) == meta.num_inputs > 1
    assert torch.equal(ctx.example_inputs[meta.input_ids], ids)
    past_key = ctx.example_inputs[meta.past[0][0]]
    assert past_key.shape[2] == ids.shape[1] + 1  # a past length distinct from the new length
    assert [r.name for r in report.records] == ["add_kv_cache", "quantize"]
    assert report.records[1].sites > 0  # quantize ran and was verified on the cached inputs
    assert len(cached(*ctx.example_inputs)) == len(cached.graph.output_node().args[0])


def test_a_rolled_back_pass_leaves_the_example_inputs_alone(graphs):
    gm, _, ids = graphs
    ctx = PassContext(example_inputs=(ids,))
    cached = run_pass(AddKvCache(), gm, ctx)
    before = ctx.example_inputs
    with pytest.raises(PassError, match="already has a KV cache"):
        run_pass(AddKvCache(), cached, ctx)
    assert ctx.example_inputs is before


@pytest.mark.slow
def test_compile_with_a_kv_cache_exports_and_checks_the_onnx_backend():
    import fxforge
    from runtime.fused_code_lm import example_ids, fused_model

    model, passes = fused_model()
    ids = example_ids(batch=2, seq=6)
    compiled = fxforge.compile(model, (ids,), passes=",".join([*passes, "add_kv_cache"]), backend="onnx")
    assert compiled.report.backend_check.ok  # ONNX ran the cached graph on its own inputs
    meta = compiled.graph_module.meta[KV_META]
    past = empty_past(meta, batch=2, dtype=torch.float32)
    flat = cached_inputs(meta, ids, 0, past)
    torch.testing.assert_close(compiled.run_flat(*flat)[0], compiled.graph_module(*flat)[0], atol=1e-4, rtol=1e-4)
