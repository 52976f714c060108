"""Passes `prune` and `sparsify` on the trained code-lm (tiny variant), one trace for both.

prune: FLAP at 20% keeps held-out perplexity closer to the dense model than magnitude and
Wanda-sp; 50% runs; FLAP's bias compensation lowers the error versus no compensation.
sparsify: Wanda beats magnitude at 2:4; DSnoT beats Wanda at 60%. Fixed data, deterministic.
"""
import pytest
import torch

from fxforge.ir.trace import trace
from fxforge.models.code_lm import load_code_lm, perplexity
from fxforge.models.code_lm_data import token_stream, windows_evenly_spaced
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.sparsify import Sparsify

pytestmark = pytest.mark.slow  # ~1 min: loads (or trains) code-lm tiny, 10 prunings, 6 sparsifications


def _quiet(iterable, **_):
    return iterable


@pytest.fixture(scope="module")
def code_lm():
    torch.set_num_threads(1)
    lm = load_code_lm("tiny")
    heldout = lm.heldout_batches(seq_len=128, max_batches=4, batch_size=4)
    stream = token_stream(lm.tokenizer, lm.train_texts()[:60])  # calibrate on training text
    calibration = [(w,) for w in windows_evenly_spaced(stream, 128, 32).split(4)]
    gm = trace(lm.model, (heldout[0],), {}, dynamic_shapes=None)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    ctx = PassContext(example_inputs=(heldout[0],), calibration=calibration, progress=_quiet)
    return gm, ctx, heldout


def _ppl(gm, batches):
    return perplexity(lambda ids: gm(ids), batches)


def _pruned(code_lm, **options):
    gm, ctx, _ = code_lm
    report = PipelineReport()
    out = run_pass(Prune(**options), gm, ctx, report=report, verify=False)
    return out, report.records[-1]


def test_flap_beats_magnitude_and_wanda_sp_at_20_percent(code_lm):
    gm, _, heldout = code_lm
    dense = _ppl(gm, heldout)
    results = {}
    for method in ("flap", "magnitude", "wanda_sp"):
        out, record = _pruned(code_lm, method=method, ratio=0.2)
        removed = 1 - record.notes["parameters_after"] / record.notes["parameters_before"]
        assert removed > 0.05, (method, removed)  # something was really removed
        results[method] = _ppl(out, heldout)
    print(f"\ncode-lm tiny, 20% structured: dense {dense:.2f}, " +
          ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    assert dense < results["flap"] < results["magnitude"]
    assert results["flap"] < results["wanda_sp"]


@pytest.mark.parametrize("method", ["flap", "magnitude", "wanda_sp"])
def test_half_the_parameters_runs(code_lm, method):
    gm, _, heldout = code_lm
    out, record = _pruned(code_lm, method=method, ratio=0.5)
    assert record.notes["parameters_after"] < 0.8 * record.notes["parameters_before"]
    ppl = _ppl(out, heldout[:1])
    assert torch.isfinite(torch.tensor(ppl)) and ppl > 1


class _Outputs(torch.fx.Interpreter):
    """Records the value of every linear node (node names survive the pass)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default:
            self.values[n.name] = value
        return value


def _linear_outputs(gm, ids):
    rec = _Outputs(gm)
    with torch.no_grad():
        rec.run(ids)
    return rec.values


def test_bias_compensation_lowers_error(code_lm):
    gm, ctx, heldout = code_lm
    dense_ppl = _ppl(gm, heldout)
    calib_ids = ctx.calibration[0][0]
    dense = _linear_outputs(gm, calib_ids)
    ppl_gap, layer_error = {}, {}
    for compensate in (True, False):
        out, record = _pruned(code_lm, method="flap", ratio=0.2, bias_compensation=compensate)
        ppl_gap[compensate] = _ppl(out, heldout) - dense_ppl
        got = _linear_outputs(out, calib_ids)
        # the error where compensation acts: the outputs of the layers whose inputs were pruned
        compensated = [n.name for n in out.graph.nodes if n.op == "call_function"
                       and n.target == torch.ops.aten.linear.default and len(n.args) > 2
                       and n.args[2] is not None]
        if compensate:
            assert compensated, "FLAP added no compensation bias"
            names = compensated
        layer_error[compensate] = sum(float((got[n] - dense[n]).pow(2).mean()) for n in names)
    assert layer_error[True] < layer_error[False], layer_error
    assert 0 < ppl_gap[True] < ppl_gap[False], ppl_gap


def test_sparsify_wanda_beats_magnitude_and_dsnot_beats_wanda(code_lm):
    gm, ctx, heldout = code_lm
    ppl = {"dense": _ppl(gm, heldout)}
    for spec in (dict(method="magnitude", pattern="2:4"), dict(method="wanda", pattern="2:4"),
                 dict(method="magnitude", sparsity=0.5), dict(method="wanda", sparsity=0.5),
                 dict(method="wanda", sparsity=0.6), dict(method="dsnot", sparsity=0.6)):
        out = run_pass(Sparsify(**spec), gm, ctx, verify=False)
        ppl[f"{spec['method']} {spec.get('pattern', spec.get('sparsity'))}"] = _ppl(out, heldout)
    print("\ncode-lm tiny sparsify perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    assert ppl["wanda 2:4"] < ppl["magnitude 2:4"]
    assert ppl["dsnot 0.6"] < ppl["wanda 0.6"]
    assert all(v > ppl["dense"] for k, v in ppl.items() if k != "dense")
