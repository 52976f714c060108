"""Pass `prune`: option validation, structure of the pruned graph (weights, reshape/expand/split
sizes, GQA variants, round_to), match counts, and that pruned graphs run in the eager, ONNX and
Triton backends and compose with fuse_attention and quantize."""
import pytest
import torch

from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, nodes_by_op
from fxforge.ir.verify import Tolerance, compare_outputs, run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.prune import Prune

aten = torch.ops.aten
ATTN = "model.layers.{}.self_attn.{}_proj.weight"
MLP = "model.layers.{}.mlp.{}_proj.weight"


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return tiny_gpt2


def _prune(setup, **options):
    gm, ctx, _ = setup
    report = PipelineReport()
    out = run_pass(Prune(**options), gm, ctx, report=report)
    return out, report.records[-1]


@pytest.mark.parametrize("options, message", [
    (dict(ratio=1.0), "[0, 1)"), (dict(ratio=-0.1), "[0, 1)"), (dict(method="random"), "method"),
    (dict(structures=("rows",)), "structures"), (dict(round_to=0), "round_to"),
    (dict(allocation="best"), "allocation"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        Prune(**options)


def test_spec_string_round_trips():
    from fxforge.passes.spec import parse_pass

    p = parse_pass("prune(method='wanda_sp',ratio=0.25,targets=['layers.1.*'],round_to=8)")
    assert p == Prune(method="wanda_sp", ratio=0.25, targets=("layers.1.*",), round_to=8)


def test_target_matching_no_group_is_an_error(llama):
    with pytest.raises(PassError, match="match no") as info:
        _prune(llama, method="magnitude", targets=("decoder.blocks.*",))
    assert "model.layers.0.mlp" in str(info.value)  # lists where groups are


def test_calibrated_methods_need_calibration(llama):
    gm, ctx, _ = llama
    bare = PassContext(example_inputs=ctx.example_inputs)
    with pytest.raises(PassError, match="calibration"):
        run_pass(Prune(method="wanda_sp"), gm, bare)


def test_magnitude_removes_kv_groups_and_channels(llama):
    gm, _, other = llama
    out, record = _prune(llama, method="magnitude", ratio=0.3)
    assert record.sites == 4  # heads and MLP channels of 2 layers
    for i in range(2):
        # one of 2 key/value groups goes, with its 2 query heads
        assert get_attr(out, ATTN.format(i, "q")).shape == (32, 64)
        assert get_attr(out, ATTN.format(i, "k")).shape == (16, 64)
        assert get_attr(out, ATTN.format(i, "v")).shape == (16, 64)
        assert get_attr(out, ATTN.format(i, "o")).shape == (64, 32)
        width = get_attr(out, MLP.format(i, "gate")).shape[0]
        assert width < 128 and get_attr(out, MLP.format(i, "down")).shape == (64, width)
    # repeat_kv's literal sizes now say 1 kv head x 2 repeats -> 2 query heads
    expands = [n.args[1][1:3] for n in nodes_by_op(out, aten.expand.default) if len(n.args[1]) == 5]
    assert expands == [[1, 2]] * 4
    assert all(n.args[1][1] == 2 for n in nodes_by_op(out, aten.reshape.default) if len(n.args[1]) == 4)
    assert 0.2 < 1 - record.notes["parameters_after"] / record.notes["parameters_before"] < 0.4
    assert any("outputs" in why for _, why in record.skipped)  # the vocabulary is listed
    logits = run_graph(out, other)[0]
    assert logits.shape == (3, 7, 256) and torch.isfinite(logits).all()


def test_query_heads_inside_groups(llama):
    out, record = _prune(llama, method="magnitude", ratio=0.5, structures=("query_heads",))
    assert record.sites == 2
    for i in range(2):
        assert get_attr(out, ATTN.format(i, "q")).shape == (32, 64)  # 1 query head per group
        assert get_attr(out, ATTN.format(i, "k")).shape == (32, 64)  # both kv heads stay
        assert get_attr(out, ATTN.format(i, "o")).shape == (64, 32)
    expands = [n.args[1][1:3] for n in nodes_by_op(out, aten.expand.default) if len(n.args[1]) == 5]
    assert expands == [[2, 1]] * 4


def test_round_to_keeps_widths_multiples(llama):
    out, _ = _prune(llama, method="magnitude", ratio=0.3, structures=("channels",), round_to=8)
    widths = [get_attr(out, MLP.format(i, "up")).shape[0] for i in range(2)]
    assert all(w % 8 == 0 and w < 128 for w in widths), widths


def test_targets_restrict_to_matching_groups(llama):
    out, record = _prune(llama, method="magnitude", ratio=0.3, targets=("layers.1.mlp",))
    assert record.sites == 1
    assert get_attr(out, MLP.format(0, "up")).shape[0] == 128
    assert get_attr(out, MLP.format(1, "up")).shape[0] < 128


def test_flap_adds_compensation_biases(llama):
    gm, ctx, other = llama
    out, record = _prune(llama, method="flap", ratio=0.3)
    assert record.notes["allocation"] == "global"
    for name in record.notes["compensated"]:
        bias = get_attr(out, name.rsplit(".", 1)[0] + ".bias")
        assert bias.abs().sum() > 0  # b = W[:, pruned]·x̄[pruned], not zeros
    assert record.notes["compensated"]
    no_comp, _ = _prune(llama, method="flap", ratio=0.3, bias_compensation=False)
    assert all(not n.endswith(".bias") for n, _ in no_comp.named_parameters() if "mlp" in n)


def test_wanda_sp_prunes_with_calibration(llama):
    out, record = _prune(llama, method="wanda_sp", ratio=0.3)
    assert record.sites >= 2
    assert run_graph(out, llama[2])[0].shape == (3, 7, 256)


def test_gpt2_heads_rewrite_fused_qkv_split(gpt2):
    out, record = _prune(gpt2, method="magnitude", ratio=0.25, structures=("heads",))
    assert record.sites == 2
    assert get_attr(out, "transformer.h.0.attn.c_attn.weight").shape == (144, 64)
    assert get_attr(out, "transformer.h.0.attn.c_attn.bias").shape == (144,)
    assert get_attr(out, "transformer.h.0.attn.c_proj.weight").shape == (64, 48)
    splits = [n.args[1] for n in nodes_by_op(out, aten.split_with_sizes.default)]
    assert splits == [[48, 48, 48]] * 2
    assert run_graph(out, gpt2[2])[0].shape == (3, 7, 256)


@pytest.fixture(scope="module")
def pruned_llama(llama):
    return _prune(llama, method="magnitude", ratio=0.3, round_to=16)[0]


@pytest.mark.slow  # the ONNX export alone takes ~20-40 s on 2 busy cores
def test_pruned_model_runs_in_onnx_runtime(pruned_llama, llama, tmp_path):
    from fxforge.backends.onnx.backend import OnnxRunner, export_onnx

    _, ctx, other = llama
    path = export_onnx(pruned_llama, ctx.example_inputs, tmp_path / "pruned.onnx")
    runner = OnnxRunner(path, threads=1)
    for inputs in (ctx.example_inputs, other):
        got = runner(*inputs)
        ref = run_graph(pruned_llama, inputs)
        assert compare_outputs(ref, list(got), Tolerance(max_abs=1e-4, rtol=1e-4)).ok


def test_pruned_model_runs_in_triton_backend_after_fuse_rms_norm(pruned_llama, llama):
    from fxforge.backends import triton as triton_backend

    _, ctx, _ = llama
    report = PipelineReport()
    fused = run_pass(get_pass_class("fuse_rms_norm")(), pruned_llama, ctx, report=report)
    assert report.records[-1].sites == 5  # 2 per layer + final norm, at the pruned widths too
    lowered = triton_backend.prepare(fused, ctx.example_inputs)
    ref = run_graph(pruned_llama, ctx.example_inputs)
    assert compare_outputs(ref, run_graph(lowered, ctx.example_inputs), Tolerance(max_abs=1e-4, rtol=1e-4)).ok


def test_pruned_heads_still_fuse_and_quantize(pruned_llama, llama):
    _, ctx, _ = llama
    report = PipelineReport()
    fused = run_pass(get_pass_class("fuse_attention")(), pruned_llama, ctx, report=report)
    assert report.records[-1].sites == 2  # one fused attention per layer, 1 kv head / 2 q heads
    quantized = run_pass(get_pass_class("quantize")(bits=8, group_size=16), fused, ctx, report=report)
    assert report.records[-1].sites > 0
    ref = run_graph(pruned_llama, ctx.example_inputs)[0]
    got = run_graph(quantized, ctx.example_inputs)[0]
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99


def test_user_graph_is_not_mutated(llama):
    gm, _, _ = llama
    before = {n: tuple(t.shape) for n, t in gm.named_parameters()}
    _prune(llama, method="magnitude", ratio=0.3)
    assert {n: tuple(t.shape) for n, t in gm.named_parameters()} == before
