"""fuse_projections: structure, exactness and match counts on Llama (GQA), BERT and GPT-2, in fp32,
int4, LoRA and sparse; every linear kind (int4, W8A8, LLM.int8, FP4, shift-add, LoRA, DoRA, Bone,
MiSS, sparse) on a small q/k/v block; skips with reasons; ONNX; the user's model untouched."""
import pytest
import torch
from torch import nn
from testing_utils import traced_zoo

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import get_attr, summarize
from fxforge.ir.trace import trace
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, PipelineReport, run_pass
from fxforge.passes.projections.fuse_projections import FuseProjections

aten = torch.ops.aten
EXACT = 1e-6


def _fuse(gm, ctx, **options):
    """(fused graph, its report record): run through run_pass, so the pipeline's check holds too."""
    report = PipelineReport()
    out = run_pass(FuseProjections(**options), gm, ctx, report=report)
    return out, report.records[-1]


def _max_error(before, after, inputs):
    return max(float((a - b).abs().max()) for a, b in zip(run_graph(before, inputs), run_graph(after, inputs)))


def _perturb(gm, seed=1):
    """Move trainable tensors off their init (LoRA's B = 0 would make the adapters trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return gm


def _count(gm, name):
    return summarize(gm).ops[name]


def _splits(gm):
    return [n for n in gm.graph.nodes if n.target == aten.split_with_sizes.default]


@pytest.fixture(scope="module")
def llama():
    zoo, gm = traced_zoo("tiny-llama")
    return zoo, gm, PassContext(example_inputs=tuple(zoo.kwargs.values()))


@pytest.fixture(scope="module")
def llama_fused(llama):
    _, gm, ctx = llama
    return _fuse(gm, ctx)


# --------------------------------------------------------------------------- zoo models, fp32


def test_llama_qkv_and_gate_up_become_one_linear_each(llama, llama_fused):
    _, gm, ctx = llama
    out, record = llama_fused
    assert record.sites == 2 * 2  # 2 layers x (q/k/v, gate/up)
    assert record.skipped == []
    assert _count(gm, "aten.linear") == 15 and _count(out, "aten.linear") == 15 - 2 * (2 + 1)
    sizes = sorted(tuple(n.args[1]) for n in _splits(out))
    assert sizes == [(64, 32, 32)] * 2 + [(128, 128)] * 2  # GQA: k and v are half of q
    qkv = get_attr(out, "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.weight")
    parts = [get_attr(gm, f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    assert torch.equal(qkv, torch.cat(parts))
    assert not any(name.endswith("q_proj.weight") for name, _ in out.named_parameters())  # held once
    fused = next(n for n in out.graph.nodes if n.target == aten.linear.default
                 and n.args[1].target.endswith("fused_q_proj_k_proj_v_proj.weight"))
    assert fused.meta["module_path"] == "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj"
    paths = sorted(u.meta["module_path"] for u in next(iter(fused.users)).users)
    assert paths == [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]  # each part keeps its member's path


def test_llama_fused_is_exact(llama, llama_fused):
    _, gm, ctx = llama
    out, record = llama_fused
    assert _max_error(gm, out, ctx.example_inputs) <= EXACT
    other = tuple(llama[0].make_inputs(batch=1, seq=7)[1].values())  # another shape: the split is symbolic-safe
    assert _max_error(gm, out, other) <= EXACT


def test_bert_fuses_query_key_value_with_biases():
    zoo, gm = traced_zoo("tiny-bert")
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()))
    out, record = _fuse(gm, ctx)
    assert record.sites == 2  # 2 layers x q/k/v; the other linears read inputs of their own
    assert _count(out, "aten.linear") == _count(gm, "aten.linear") - 2 * 2
    bias = get_attr(out, "encoder.layer.1.attention.self.fused_query_key_value.bias")
    assert bias.shape == (3 * 64,)
    assert _max_error(gm, out, ctx.example_inputs) <= EXACT


def test_gpt2_has_nothing_to_fuse():
    # c_attn is already one fused q/k/v linear and the MLP has no gate/up: no two linears share an input
    zoo, gm = traced_zoo("tiny-gpt2")
    out, record = _fuse(gm, PassContext(example_inputs=tuple(zoo.kwargs.values())))
    assert record.sites == 0 and [where for where, _ in record.skipped] == ["<graph>"]  # zero, but never silent
    assert "nothing to fuse" in record.skipped[0][1]
    assert _count(out, "aten.linear") == _count(gm, "aten.linear") and not _splits(out)


# --------------------------------------------------------------------------- options


def test_min_group_and_targets(llama):
    _, gm, ctx = llama
    out, record = _fuse(gm, ctx, min_group=3)
    assert record.sites == 2  # q/k/v only
    assert sorted(path for path, _ in record.skipped) == sorted(
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up"))
    assert all("min_group=3" in why for _, why in record.skipped)
    _, record = _fuse(gm, ctx, targets=("mlp.*",))
    assert record.sites == 2 and all("mlp" in p for p in record.notes["fused"])
    _, record = _fuse(gm, ctx, exclude="v_proj")  # q/k still fuse; a string is one pattern
    assert record.sites == 4 and all("v_proj" not in p for p in record.notes["fused"])


def test_options_parse_and_bad_min_group_is_rejected():
    assert Pipeline("fuse_projections(targets=[mlp.*],min_group=3)").passes[0] \
        == FuseProjections(targets=("mlp.*",), min_group=3)
    p = FuseProjections(exclude=("v_proj",), min_group=3)
    assert Pipeline(p.spec()).passes[0] == p
    with pytest.raises(ValueError, match="min_group"):
        FuseProjections(min_group=1)


# --------------------------------------------------------------------------- quantized, adapted, sparse llama


def test_int4_fuses_packed_codes_scales_and_zeros(llama):
    _, gm, ctx = llama
    quantized = run_pass(Pipeline("quantize(bits=4,group_size=32,include_lm_head=False)").passes[0], gm, ctx)
    out, record = _fuse(quantized, ctx)
    assert record.sites == 4
    assert _count(quantized, "fxforge.linear_wq") == 14 and _count(out, "fxforge.linear_wq") == 8
    scales = get_attr(out, "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.scales")
    assert scales.shape == (128, 64 // 32)
    assert _max_error(quantized, out, ctx.example_inputs) <= EXACT


def test_mismatched_group_sizes_are_skipped_with_the_reason(llama):
    _, gm, ctx = llama
    mixed, _ = Pipeline("quantize(bits=4,group_size=32,targets=('q_proj',)),"
                        "quantize(bits=4,group_size=16,targets=('k_proj','v_proj'))").run(gm, ctx)
    out, record = _fuse(mixed, ctx)
    assert record.sites == 2 + 2  # k/v (group 16) per layer, and the float gate/up
    skipped = dict(record.skipped)
    assert sorted(skipped) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert "group_size 32 vs 16" in skipped["model.layers.0.self_attn.q_proj"]
    assert _max_error(mixed, out, ctx.example_inputs) <= EXACT


def test_different_packed_layouts_are_skipped_as_other_kinds(llama):
    _, gm, ctx = llama
    mixed, _ = Pipeline("quantize(bits=4,group_size=16,group_axis=out,targets=('q_proj',)),"
                        "quantize(bits=4,group_size=32,targets=('k_proj','v_proj'))").run(gm, ctx)
    out, record = _fuse(mixed, ctx, targets=("self_attn.*",))
    assert record.sites == 2  # k/v per layer
    why = dict(record.skipped)["model.layers.1.self_attn.q_proj"]
    assert "fxforge::linear_wq_ic" in why and "kinds fuse only with their own" in why
    assert _max_error(mixed, out, ctx.example_inputs) <= EXACT


def test_composes_with_fuse_attention(llama, llama_fused):
    _, gm, ctx = llama
    out, _ = llama_fused
    report = PipelineReport()
    attention = run_pass(Pipeline("fuse_attention").passes[0], out, ctx, report=report)
    assert report.records[-1].sites == 2  # the split q/k/v still feed a provable attention
    assert _max_error(gm, attention, ctx.example_inputs) <= 1e-5


def test_lora_fuses_with_stacked_a_and_block_diagonal_b(llama):
    _, gm, ctx = llama
    adapted = _perturb(run_pass(Pipeline("add_adapters(method=lora,rank=4)").passes[0], gm, ctx))
    out, record = _fuse(adapted, ctx)
    assert record.sites == 4
    assert _count(out, "fxforge.lora_linear") == 14 - 4 - 2
    path = "model.layers.0.self_attn.fused_q_proj_k_proj_v_proj"
    assert get_attr(out, f"{path}.lora_A").shape == (3 * 4, 64)
    lora_b = get_attr(out, f"{path}.lora_B")
    assert lora_b.shape == (128, 12) and torch.count_nonzero(lora_b[:64, 4:]) == 0  # block-diagonal
    assert _max_error(adapted, out, ctx.example_inputs) <= EXACT
    records = out.meta["fxforge_adapters"]
    assert "model.layers.0.self_attn.q_proj" not in records
    assert records[path]["rank"] == 12 and records[path]["fused_from"][0].endswith("q_proj")
    merged = run_pass(Pipeline("merge_adapters").passes[0], out, ctx)  # the fused record still merges
    assert _count(merged, "fxforge.lora_linear") == 0
    assert _max_error(adapted, merged, ctx.example_inputs) <= 1e-4


def test_lora_with_differing_scales_folds_them_into_b(llama):
    _, gm, ctx = llama
    adapted, _ = Pipeline("add_adapters(method=lora,rank=4,alpha=8,targets=('q_proj',)),"
                          "add_adapters(method=lora,rank=2,alpha=8,targets=('k_proj','v_proj'))").run(gm, ctx)
    adapted = _perturb(adapted)
    out, record = _fuse(adapted, ctx, targets=("self_attn.*",))
    assert record.sites == 2
    fused = next(n for n in out.graph.nodes if n.target == torch.ops.fxforge.lora_linear.default
                 and "fused" in n.args[1].target)
    assert fused.args[5] == 1.0  # scales 2 and 4 now live in B
    assert _max_error(adapted, out, ctx.example_inputs) <= EXACT


def test_sparsified_weights_fuse_and_keep_their_masks(llama):
    _, gm, ctx = llama
    sparse = run_pass(Pipeline("sparsify(method=magnitude,sparsity=0.5)").passes[0], gm, ctx)
    out, record = _fuse(sparse, ctx)
    assert record.sites == 4
    masks = out.meta["fxforge_sparsity_masks"]
    name = "model.layers.0.mlp.fused_gate_proj_up_proj.weight"
    assert "model.layers.0.mlp.gate_proj.weight" not in masks and masks[name].shape == (256, 64)
    assert torch.all(get_attr(out, name)[~masks[name]] == 0)
    assert _max_error(sparse, out, ctx.example_inputs) <= EXACT


def test_qlora_bases_are_skipped(llama):
    _, gm, ctx = llama
    qlora, _ = Pipeline("quantize(bits=4,group_size=32),add_adapters(method=lora,rank=4)").run(gm, ctx)
    out, record = _fuse(qlora, ctx)
    assert record.sites == 0 and len(record.skipped) == 2 * 5
    assert all("QLoRA" in why for _, why in record.skipped)


@pytest.mark.slow  # one ONNX export of Llama: ~1 min on 2 busy cores
def test_onnx_runs_the_fused_int4_graph(llama):
    import fxforge
    from fxforge.ir.ops import lowering_tolerance
    from fxforge.ir.verify import Tolerance, compare_outputs

    zoo, gm, ctx = llama
    fused = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, backend="onnx",
                            passes="quantize(bits=4,group_size=32),fuse_projections")
    assert fused.report.pipeline["fuse_projections"].sites == 4
    assert fused.report.backend_check.ok  # ORT vs the fused graph run eagerly
    # and vs the unfused int4 graph, at another shape, within what MatMulNBits declares
    unfused = run_pass(Pipeline("quantize(bits=4,group_size=32)").passes[0], gm, ctx)
    inputs = zoo.make_inputs(batch=1, seq=9)[1]
    want = run_graph(unfused, tuple(inputs.values()))
    got = fused(**inputs)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    tolerance = lowering_tolerance("onnx", "linear_wq") or Tolerance(max_abs=1e-4, rtol=1e-4)
    comparison = compare_outputs(want, [g.logits if hasattr(g, "logits") else g for g in got], tolerance)
    assert comparison.ok, comparison.describe()


# --------------------------------------------------------------------------- int4, LoRA, sparse on every zoo model


@pytest.fixture(scope="module")
def zoo_graph(llama):
    """name -> (zoo, traced graph, context), each model traced once for this module."""
    cache = {"tiny-llama": llama}

    def get(name):
        if name not in cache:
            zoo, gm = traced_zoo(name)
            cache[name] = zoo, gm, PassContext(example_inputs=tuple(zoo.kwargs.values()))
        return cache[name]
    return get


ZOO_KINDS = {  # kind -> (pass spec, the linear op it leaves); LoRA's default targets: every linear but the LM head
    "int4": ("quantize(bits=4,group_size=32)", "fxforge.linear_wq"),
    "lora": ("add_adapters(method=lora,rank=4)", "fxforge.lora_linear"),
    "sparse": ("sparsify(method=magnitude,sparsity=0.5)", "aten.linear"),
}
ZOO_SITES = {  # llama: q/k/v and gate/up per layer; bert: q/k/v per layer;
    "tiny-llama": 2 * 2, "tiny-bert": 2, "tiny-gpt2": 0}  # gpt2: c_attn is already one fused q/k/v


@pytest.mark.parametrize("kind", ZOO_KINDS)
@pytest.mark.parametrize("model", ZOO_SITES)
def test_int4_lora_and_sparse_fuse_exactly_on_every_zoo_model(zoo_graph, model, kind):
    _, gm, ctx = zoo_graph(model)
    spec, op = ZOO_KINDS[kind]
    before = run_pass(Pipeline(spec).passes[0], gm, ctx)
    if kind == "lora":
        before = _perturb(before)  # B = 0 would make the adapters trivially exact
    out, record = _fuse(before, ctx)
    assert record.sites == ZOO_SITES[model]
    assert [where for where, _ in record.skipped] == ([] if ZOO_SITES[model] else ["<graph>"])  # a zero says why
    fused_away = sum(len(members) - 1 for members in record.notes["fused"].values())
    assert _count(out, op) == _count(before, op) - fused_away  # gpt2: unchanged
    assert len(_splits(out)) == record.sites
    assert _max_error(before, out, ctx.example_inputs) <= EXACT


# --------------------------------------------------------------------------- every linear kind, small block


class Block(nn.Module):
    """q (32 wide, bias), k (16, no bias) and v (16, bias) read one normalized input."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16, bias=False), nn.Linear(32, 16)
        self.o = nn.Linear(48, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.o(torch.cat([self.q(h), self.k(h) * self.v(h)], dim=-1))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32) * 2
    gm = trace(Block().eval(), (x,))
    canonicalize(gm)
    return gm, PassContext(example_inputs=(x,))


KINDS = [
    ("quantize(bits=4,group_size=16,group_axis='out')", "fxforge.linear_wq_ic"),
    ("quantize(bits=8,group_size=16)", "fxforge.linear_wq"),
    ("quantize_dynamic", "fxforge.linear_w8a8"),
    ("llm_int8(threshold=2.0)", "fxforge.linear_int8_mixed"),
    ("quantize_fp(fmt='e2m1',group_size=16,act_fmt='e4m3')", "fxforge.linear_fp"),
    ("shift_add(group_size=16,iters=2)", "fxforge.shift_add_linear"),
    ("quantize(bits=4,group_size=16,method=easyquant,range_steps=2,outlier_sigma=1.5)", "fxforge.linear_sparse"),
    ("add_adapters(method=dora,rank=4)", "fxforge.dora_linear"),
    ("add_adapters(method=bone,rank=4,bone_form=bat)", "fxforge.bone_linear"),
    ("add_adapters(method=bone,rank=4)", "fxforge.miss_linear"),
]


@pytest.mark.parametrize("spec, op", KINDS, ids=[op.split(".")[1] for _, op in KINDS])
def test_every_linear_kind_fuses_exactly(block, spec, op):
    gm, ctx = block
    before, _ = Pipeline(spec).run(gm, ctx)
    before = _perturb(before)
    out, record = _fuse(before, ctx)
    assert record.sites >= 1 and record.skipped == []
    fused_away = sum(len(members) - 1 for members in record.notes["fused"].values())
    assert _count(out, op) == _count(before, op) - fused_away
    # each group: n member calls out; the fused call, a split and n getitems in
    assert sum(summarize(out).ops.values()) - sum(summarize(before).ops.values()) == 2 * record.sites
    assert _max_error(before, out, ctx.example_inputs) <= EXACT


def test_bitdelta_with_differing_alphas_is_skipped_naming_the_op(block):
    # one α per matrix: the op cannot keep the members' α apart, so they stay unfused
    from fxforge.passes.quantize.bitdelta import BitDelta

    gm, ctx = block
    base = {name: value - 0.01 * torch.randn_like(value) for name, value in gm.state_dict().items()}
    delta = run_pass(BitDelta(base=base), gm, ctx)
    out, record = _fuse(delta, ctx)
    assert record.sites == 0
    assert sorted(path for path, _ in record.skipped) == ["k", "q", "v"]
    assert all(why.startswith("fxforge::linear_bitdelta") and "alpha" in why for _, why in record.skipped)
    from fxforge.ir.graph import set_attr

    alphas = [n.args[3].target for n in delta.graph.nodes if n.target == torch.ops.fxforge.linear_bitdelta.default
              and n.args[3].target.split(".")[0] in "qkv"]
    for name in alphas:  # with one α the members fuse, α shared
        set_attr(delta, name, torch.tensor([0.02]))
    out, record = _fuse(delta, ctx)
    assert record.sites == 1 and record.skipped == []
    assert _max_error(delta, out, ctx.example_inputs) <= EXACT


def test_medusa_heads_first_blocks_fuse(llama):
    _, gm, ctx = llama
    medusa = _perturb(run_pass(Pipeline("add_medusa_heads(num_heads=3,num_layers=1)").passes[0], gm, ctx))
    out, record = _fuse(medusa, ctx)
    assert record.sites == 4 + 1  # the three heads' ResBlocks read the final hidden state
    heads = [p for p in record.notes["fused"] if p.startswith("medusa_heads")]
    assert len(heads) == 1 and len(record.notes["fused"][heads[0]]) == 3
    assert _max_error(medusa, out, ctx.example_inputs) <= EXACT


def test_users_model_untouched_and_fused_adapters_save_load_and_ship(block, tmp_path):
    # the artifact and the adapter file name the fused layer; both round-trip
    import fxforge
    from fxforge.adapters_io import load_adapters, save_adapters

    _, ctx = block
    torch.manual_seed(0)
    model = Block().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = fxforge.compile(model, ctx.example_inputs, passes="add_adapters(method=lora,rank=4),fuse_projections")
    assert compiled.report["fuse_projections"].sites == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    _perturb(compiled.graph_module)
    compiled.save(tmp_path / "model")
    loaded = fxforge.load(tmp_path / "model")
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(loaded(x), compiled(x), atol=0, rtol=0)
    save_adapters(compiled, tmp_path / "adapters.safetensors")
    assert "fused_q_k_v" in load_adapters(fxforge.load(tmp_path / "model"), tmp_path / "adapters.safetensors")


def test_block_before_and_after(block):
    """Three linears reading one input become one linear on the stacked weights and a split."""
    from graph_text import assert_graph

    gm, ctx = block
    head = """
        x = input()
        layer_norm = aten.layer_norm(x, [32], @norm.weight, @norm.bias, 1e-05, False)
    """
    tail = """
        cat = aten.cat([linear, mul], -1)
        linear_3 = aten.linear(cat, @o.weight, @o.bias)
        return (linear_3,)
    """
    assert_graph(gm, head + """
        linear = aten.linear(layer_norm, @q.weight, @q.bias)
        linear_1 = aten.linear(layer_norm, @k.weight)
        linear_2 = aten.linear(layer_norm, @v.weight, @v.bias)
        mul = aten.mul.Tensor(linear_1, linear_2)
    """ + tail)
    out, record = _fuse(gm, ctx)
    assert record.sites == 1
    # k has no bias: the fused bias holds zeros in its rows (checked exact below)
    assert_graph(out, head + """
        linear_default = aten.linear(layer_norm, @fused_q_k_v.weight, @fused_q_k_v.bias)
        split_with_sizes_default = aten.split_with_sizes(linear_default, [32, 16, 16], -1)
        getitem = getitem(split_with_sizes_default, 0)
        getitem_1 = getitem(split_with_sizes_default, 1)
        getitem_2 = getitem(split_with_sizes_default, 2)
        mul = aten.mul.Tensor(getitem_1, getitem_2)
    """ + tail.replace("[linear, mul]", "[getitem, mul]"))
    assert _max_error(gm, out, ctx.example_inputs) <= EXACT
