"""quantize(method=gptq|awq): the algorithms on single matrices, AWQ's scale folding keeps the
float graph equivalent, and both beat RTN on held-out inputs of tiny-llama and tiny-gpt2."""
import copy

import pytest
import torch
from testing_utils import traced_zoo

from fxforge.ir.graph import get_attr, linear_sites
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize import Quantize
from fxforge.passes.quantize.awq import apply_awq_scales, quantize_weight_awq
from fxforge.calibration.engine import calibrate
from fxforge.calibration.observers import InputStatistics
from fxforge.passes.quantize.common import relative_error
from fxforge.passes.quantize.gptq import quantize_weight_gptq
from fxforge.passes.quantize.rtn import QuantSpec, quantize_weight_rtn


def _token_batches(count, batch=2, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 256, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(count)]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    zoo, gm = traced_zoo(request.param)
    held_out = tuple(_token_batches(1, batch=4, seed=99)[0].values())
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=_token_batches(8))
    return request.param, gm, ctx, held_out


def _correlated_inputs(rows=512, k=64):
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    return (torch.randn(rows, k) * torch.linspace(0.1, 3.0, k)) @ mix


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(16, 64)
    gptq = quantize_weight_gptq(w, QuantSpec(4, 32), torch.eye(64), damp=0.0)
    rtn = quantize_weight_rtn(w, QuantSpec(4, 32))
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("group_axis,group_size", [("in", 16), ("in", 64), ("out", 8)])
def test_gptq_lowers_output_error(group_axis, group_size):
    x, w = _correlated_inputs(), torch.randn(32, 64)
    spec = QuantSpec(3, group_size)
    m = w if group_axis == "in" else w.T
    as_w = (lambda qm: qm.dequantize()) if group_axis == "in" else (lambda qm: qm.dequantize().T)
    gptq = as_w(quantize_weight_gptq(m, spec, x.T @ x / len(x), group_axis, block_size=16))
    rtn = as_w(quantize_weight_rtn(m, spec))
    assert relative_error(x @ w.T, x @ gptq.T) < 0.8 * relative_error(x @ w.T, x @ rtn.T)


@pytest.mark.parametrize("group_axis", ["in", "out"])
def test_awq_clip_search_never_loses_to_rtn(group_axis):
    x, w = _correlated_inputs(), torch.randn(32, 64)
    w[0, 0] = 8.0  # an outlier the clip search should trade off
    stats = InputStatistics("x", ("samples", "abs_mean"), width=64, rows_per_batch=len(x))
    stats.update(x)
    m, spec = (w if group_axis == "in" else w.T), QuantSpec(3, 16)
    as_w = (lambda t: t) if group_axis == "in" else (lambda t: t.T)
    awq = as_w(quantize_weight_awq(m, spec, stats, group_axis).dequantize())
    rtn = as_w(quantize_weight_rtn(m, spec).dequantize())
    assert relative_error(x @ w.T, x @ awq.T) < relative_error(x @ w.T, x @ rtn.T)


def test_awq_scale_folding_keeps_the_float_graph_equivalent(model):
    name, gm, ctx, held_out = model
    work = copy.deepcopy(gm)
    sites = linear_sites(work)
    stats = calibrate(work, ctx, {s.node: ("abs_mean", "samples") for s in sites}).statistics  # nothing rewritten
    specs = {s.node.name: QuantSpec(3, 32) for s in sites}
    report = apply_awq_scales(work, sites, specs, stats, grid=20, group_axis="in")
    # llama: q/k/v <- input norm, gate/up <- post-attention norm, down <- up; gpt2: c_attn, c_fc <- ln
    assert report["groups_scaled"] == (6 if name == "tiny-llama" else 4)
    assert any(alpha > 0 for alpha in report["alphas"].values())  # some scale is not all ones
    changed = [n for n, p in work.named_parameters() if not torch.equal(p, get_attr(gm, n))]
    assert any("norm" in n or ".ln_" in n for n in changed)  # 1/s went into a producer
    torch.testing.assert_close(run_graph(work, held_out)[0], run_graph(gm, held_out)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_beats_rtn_on_held_out_inputs(model, method):
    name, gm, ctx, held_out = model
    ref = run_graph(gm, held_out)[0]
    # the layers only: a tiny model's LM head is most of its weights and says little about a method
    rtn = run_pass(Quantize(bits=3, group_size=32, include_lm_head=False), gm, ctx)
    better = run_pass(Quantize(bits=3, group_size=32, method=method, include_lm_head=False), gm, ctx)
    assert sum(1 for n in better.graph.nodes if n.target == torch.ops.fxforge.linear_wq.default) == \
        (14 if name == "tiny-llama" else 8)
    assert relative_error(ref, run_graph(better, held_out)[0]) < relative_error(ref, run_graph(rtn, held_out)[0])


def test_gptq_warns_when_calibration_has_fewer_tokens_than_features():
    _, gm = traced_zoo("mlp")  # fc1 takes 32 features, fc2/fc3 64
    few = [torch.randn(2, 32)]  # 2 rows: every Hessian is singular
    ctx = PassContext(example_inputs=(torch.randn(4, 32),), calibration=few)
    with pytest.warns(UserWarning, match=r"fewer calibration tokens than input features .*raise damp"):
        result = run_pass(Quantize(bits=4, group_size=16, method="gptq"), gm, ctx, verify=False)
    assert result is not None
    enough = [torch.randn(64, 32) for _ in range(2)]  # 128 rows > 64 features
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error", UserWarning)
        run_pass(Quantize(bits=4, group_size=16, method="gptq"), gm, PassContext(example_inputs=ctx.example_inputs,
                                                                                  calibration=enough), verify=False)


def test_gptq_quantizes_layers_sharing_an_input_together_with_the_same_codes(monkeypatch):
    """The pass hands q/k/v (and gate/up) to GPTQ as one stacked problem: same codes as one at a time."""
    import fxforge.passes.quantize.gptq as gptq

    zoo, gm = traced_zoo("tiny-llama")
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=_token_batches(2))
    spec = Quantize(bits=4, group_size=32, method="gptq", include_lm_head=False)

    def weights(out):
        return {n.name: [get_attr(out, a.target) for a in n.all_input_nodes if a.op == "get_attr"]
                for n in out.graph.nodes if n.target == torch.ops.fxforge.linear_wq.default}

    sizes = []
    real = gptq.quantize_weights_gptq
    monkeypatch.setattr(gptq, "quantize_weights_gptq", lambda m, *a, **k: sizes.append(len(m)) or real(m, *a, **k))
    together = weights(run_pass(spec, gm, ctx, verify=False))
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 3, 3]  # 2 layers of q/k/v, o, gate/up, down
    monkeypatch.setattr(gptq._SharedInputs, "take_group", lambda self, name: [])  # every layer alone
    alone = weights(run_pass(spec, gm, ctx, verify=False))
    assert len(together) == 14 and together.keys() == alone.keys()
    for name, tensors in together.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, alone[name], strict=True)), name
