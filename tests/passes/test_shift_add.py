"""Pass `shift_add`: structure, match counts and numerics on tiny GPT-2 and Llama; BCQ algorithm; bad input."""
import copy

import pytest
import torch

from fxforge.errors import PassError, PassSpecError
from fxforge.ir.graph import get_attr, linear_sites
from fxforge.ir.ops.shift_add_linear import check_invariants, dequantize_shift_add
from fxforge.ir.trace import flatten_inputs, trace
from fxforge.ir.verify import Tolerance, compare_outputs, run_graph
from fxforge.models import get_model
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.shift_add import ShiftAdd, allocate_bits
from fxforge.passes.shift_add_bcq import (
    fit_groups,
    output_error,
    quantize_bcq,
    quantize_bcq_calibrated,
)

OP = torch.ops.fxforge.shift_add_linear.default
EXPECTED_SITES = {"tiny-gpt2": 8, "tiny-llama": 14}  # 2 layers x (attn + MLP linears), no lm_head


def _prepare(name):
    zoo = get_model(name)
    gm = trace(zoo.model, zoo.args, zoo.kwargs)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext())
    example = tuple(flatten_inputs(gm, zoo.args, zoo.kwargs))
    calibration = [zoo.make_inputs(batch=2, seq=16) for _ in range(3)]
    return gm, example, calibration


@pytest.fixture(scope="module")
def gpt2():
    return _prepare("tiny-gpt2")


@pytest.fixture(scope="module")
def llama():
    return _prepare("tiny-llama")


def _shift_add_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == OP]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_structure_match_count_and_invariants(model, request):
    gm, example, _ = request.getfixturevalue(model)
    name = {"gpt2": "tiny-gpt2", "llama": "tiny-llama"}[model]
    before_weights = {s.weight_name for s in linear_sites(gm)}
    ctx = PassContext(example_inputs=example)
    out = run_pass(ShiftAdd(bits=3, group_size=32, iters=3), gm, ctx)
    nodes = _shift_add_nodes(out)
    assert len(nodes) == EXPECTED_SITES[name]
    # only the LM head stays a float linear
    assert [s.module_path for s in linear_sites(out, include_lm_head=True)] == ["lm_head"]
    params = dict(out.named_parameters())
    assert not before_weights & set(params), "replaced float weights must be gone"
    for node in nodes:
        x, packed, exps, signs, bias, g = node.args
        packed, exps, signs = (get_attr(out, a.target) for a in (packed, exps, signs))
        assert packed.dtype == torch.int32 and packed.shape[2] == 3 and g == 32
        assert exps.dtype == signs.dtype == torch.int8 and exps.shape[-1] == 3
        check_invariants(packed, exps, signs, g, x.meta["val"].shape[-1])
        assert node.meta["module_path"]
    # the input graph is untouched
    assert not _shift_add_nodes(gm)
    # loss floor of honest 3-plane BCQ on a random-init model (the pipeline checks bugs, not this)
    cmp = compare_outputs(run_graph(gm, example), run_graph(out, example),
                          Tolerance.lossy(min_cosine=ShiftAdd(bits=3).expected_cosine()))
    assert cmp.ok, cmp.describe()


def test_op_output_equals_dequantized_linear(gpt2):
    gm, example, _ = gpt2
    out = run_pass(ShiftAdd(bits=2, group_size=64, iters=2), gm, PassContext(example_inputs=example))
    node = _shift_add_nodes(out)[0]
    _, packed, exps, signs, bias, g = node.args
    packed, exps, signs = (get_attr(out, a.target) for a in (packed, exps, signs))
    weight = dequantize_shift_add(packed, exps, signs, g, packed.shape[1] * 32)
    x = torch.randn(3, packed.shape[1] * 32)
    b = get_attr(out, bias.target)
    torch.testing.assert_close(OP(x, packed, exps, signs, b, g), torch.nn.functional.linear(x, weight, b))


def test_more_bits_and_calibration_reduce_error(llama):
    gm, example, calibration = llama
    errors = {}
    ref = run_graph(gm, example)
    for spec in ["shift_add(bits=2,group_size=32,iters=3)", "shift_add(bits=4,group_size=32,iters=3)",
                 "shift_add(bits=2,group_size=32,iters=3,method='bcq_calibrated')"]:
        ctx = PassContext(example_inputs=example, calibration=calibration)
        out, _ = Pipeline(spec).run(gm, ctx)
        errors[spec] = compare_outputs(ref, run_graph(out, example), Tolerance(max_abs=None)).outputs[0].rel_l2
    two, four, calibrated = errors.values()
    assert four < two
    assert calibrated < two


def test_targets_and_exclude(llama):
    gm, example, _ = llama
    ctx = PassContext(example_inputs=example)
    out = run_pass(ShiftAdd(bits=3, group_size=32, iters=1, targets=("mlp.*",), exclude=("down_proj",)), gm, ctx)
    paths = sorted(n.meta["module_path"] for n in _shift_add_nodes(out))
    assert len(paths) == 4 and all(".mlp." in p and "down_proj" not in p for p in paths)


def test_bit_budget_allocates_and_meets_average(llama):
    gm, example, calibration = llama
    from fxforge.passes.pipeline import PipelineReport

    report = PipelineReport()
    ctx = PassContext(example_inputs=example, calibration=calibration)
    out = run_pass(ShiftAdd(group_size=32, iters=1, bit_budget=2.5), gm, ctx, report=report)
    notes = report["shift_add"].notes
    assert set(notes["bits"].values()) <= {2, 3, 4}
    assert len(set(notes["bits"].values())) > 1, "a 2.5 budget should mix plane counts"
    assert notes["avg_planes"] <= 2.5 + 1e-9
    planes = {n.meta["module_path"]: get_attr(out, n.args[1].target).shape[2] for n in _shift_add_nodes(out)}
    assert planes == notes["bits"]


def test_allocate_bits_prefers_sensitive_layers():
    errors = {"a": {2: 9.0, 3: 1.0, 4: 0.5}, "b": {2: 2.0, 3: 1.5, 4: 1.4}}
    assert allocate_bits(errors, {"a": 1, "b": 1}, 2.5) == {"a": 3, "b": 2}
    assert allocate_bits(errors, {"a": 1, "b": 1}, 4.0) == {"a": 4, "b": 4}
    assert allocate_bits(errors, {"a": 1, "b": 1}, 2.0) == {"a": 2, "b": 2}


def test_alternating_fit_beats_greedy_init():
    torch.manual_seed(1)
    w = torch.randn(256, 32)
    greedy = fit_groups(w, 3, 8, iters=0)
    refined = fit_groups(w, 3, 8, iters=8)
    from fxforge.ir.ops.shift_add_linear import apot_value

    def err(result):
        codes, exps, signs = result
        return float((w - (codes * apot_value(exps, signs)[:, None, :]).sum(-1)).pow(2).sum())

    assert err(refined) < 0.95 * err(greedy)


def test_calibrated_bcq_lowers_output_error():
    torch.manual_seed(2)
    # correlated input channels, as in LLM activations: where error feedback pays off
    x = torch.randn(512, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(512, 64)
    hessian = x.T @ x / x.shape[0]
    w = torch.randn(32, 64)
    plain = quantize_bcq(w, 2, 32, 3, iters=5)
    calibrated = quantize_bcq_calibrated(w, hessian, 2, 32, 3, iters=5)
    assert output_error(w, calibrated.dequantize(), hessian) < 0.5 * output_error(w, plain.dequantize(), hessian)


@pytest.mark.parametrize("options, message", [
    ({"bits": 0}, "bits=0 is out of range"),
    ({"bits": 9}, "bits=9 is out of range"),
    ({"group_size": 12}, "multiple of 8"),
    ({"apot_terms": 0}, "apot_terms=0"),
    ({"bit_budget": 1.5}, "bit_budget=1.5"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ShiftAdd(**options)


def test_bad_method_in_spec():
    with pytest.raises(PassSpecError):
        Pipeline("shift_add(method='rtn')")


def test_group_size_not_dividing_layer_leaves_model_untouched(gpt2):
    gm, example, _ = gpt2
    code = gm.code
    with pytest.raises(PassError, match="group_size=48 does not divide the 64 input features"):
        run_pass(ShiftAdd(group_size=48), gm, PassContext(example_inputs=example))
    assert gm.code == code and not _shift_add_nodes(gm)


def test_calibrated_without_data_is_a_clear_error(gpt2):
    gm, example, _ = gpt2
    with pytest.raises(PassError, match=r"\(method='bcq_calibrated'\) needs calibration data"):
        run_pass(ShiftAdd(group_size=32, method="bcq_calibrated"), copy.deepcopy(gm), PassContext(example_inputs=example))


def test_empty_calibration_is_a_clear_error(gpt2):
    gm, example, _ = gpt2
    with pytest.raises(PassError, match="got no calibration batches"):
        run_pass(ShiftAdd(group_size=32, method="bcq_calibrated"), gm, PassContext(example_inputs=example, calibration=[]))


def test_registered_by_name():
    assert get_pass_class("shift_add") is ShiftAdd
    assert Pipeline("shift_add(bits=2,group_size=-1)").passes[0] == ShiftAdd(bits=2, group_size=-1)


@pytest.mark.slow
def test_composes_after_prune_and_with_fuse_attention(llama):
    gm, example, calibration = llama
    ctx = PassContext(example_inputs=example, calibration=calibration, progress=lambda it=None, **kw: it)
    spec = ("prune(method='magnitude',ratio=0.25,structures=('channels',),round_to=8),fuse_attention,"
            "shift_add(bits=4,group_size=-1,iters=2,method='bcq_calibrated')")
    out, report = Pipeline(spec).run(gm, ctx)  # each pass verified against the graph before it
    assert report["shift_add"].sites == EXPECTED_SITES["tiny-llama"]
    assert sum(n.target == torch.ops.fxforge.attention.default for n in out.graph.nodes) == 2
    widths = {n.meta["module_path"]: n.args[0].meta["val"].shape[-1] for n in _shift_add_nodes(out)}
    # shift_add quantized the pruned MLP: down_proj reads fewer than the original 128 channels
    assert all(w < 128 for p, w in widths.items() if p.endswith("down_proj"))
    cmp = compare_outputs(run_graph(gm, example), run_graph(out, example),
                          Tolerance.lossy(min_cosine=ShiftAdd(bits=2).expected_cosine()))
    assert cmp.ok, cmp.describe()


def test_compiled_model_saves_and_loads(tmp_path):
    import fxforge

    zoo = get_model("mlp")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, passes="shift_add(bits=3,group_size=-1,iters=1)")
    compiled.save(tmp_path / "sa")
    loaded = fxforge.load(tmp_path / "sa")
    args, kwargs = zoo.make_inputs(batch=3)
    assert torch.equal(compiled(*args, **kwargs), loaded(*args, **kwargs))
    packed = [b for name, b in loaded.graph_module.named_buffers() if name.endswith("sa_packed")]
    assert len(packed) == 3 and all(b.dtype == torch.int32 for b in packed)
