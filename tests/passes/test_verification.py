"""Verification separates bugs from loss (issue 14, item 4).

On a random-weight TinyLlama-shaped model (tests/verification_helpers.py) honest 4-bit RTN,
GPTQ and W8A8 compile with verification on and report their loss, while broken rewrites (scales
off by one group, a bug at batch 3 only, inverted sparsity masks, misaligned pruning) are rejected
by name, and max_loss bounds the loss when asked.
"""
import pytest
import torch
from verification_helpers import (
    InvertedMaskSparsify, MisalignedPrune, OffByOneGroupQuantize, WrongAtBatch3Quantize, build_tinyllama_shaped,
    calibration_for, outputs_equal, traced_tinyllama,
)

import fxforge
from fxforge.errors import PassError
from fxforge.ir.graph import get_attr
from fxforge.ir.reference import Semantics, reference_graph
from fxforge.ir.shapes import second_shape_inputs
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline, PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.sparsify import Sparsify
from fxforge.passes.quantize import Quantize

SHAPES = ["2x16, 2x16", "3x12, 3x12"]  # the example inputs, then the second shape


@pytest.fixture(scope="module")
def tinyllama():
    return build_tinyllama_shaped()


def _record(p, calibration=None, hidden=256):
    _, kwargs, gm, ctx = traced_tinyllama(hidden)
    ctx.calibration = calibration
    report = PipelineReport()
    run_pass(p, gm, ctx, report=report)
    return report.records[-1]


# --------------------------------------------------------------------------- honest loss passes


def test_4bit_rtn_compiles_with_verification_and_reports_its_loss(tinyllama):
    model, kwargs = tinyllama
    compiled = fxforge.compile(model, (), kwargs, passes="quantize(bits=4)")
    record = compiled.report["quantize"]
    assert record.sites == 15  # 7 linears per layer and the LM head (included by default)
    assert record.verified_against == "semantics" and record.verified_shapes == SHAPES
    assert record.check_error <= 1e-5  # equals the graph with the dequantized weights
    assert record.rel_l2 > 0.05 and record.cosine < 0.999  # honest loss, measured, not refused
    assert len(record.loss) == 1 and record.loss[0].rel_l2 == record.rel_l2
    table = str(compiled.report)
    assert "rel L2" in table and "verified against semantics at 2x16, 2x16 and 3x12, 3x12" in table


@pytest.mark.filterwarnings("ignore:quantize.method='gptq'.:UserWarning")  # few calibration tokens, on purpose
def test_gptq_compiles_with_verification_against_its_dequantized_weights(tinyllama):
    model, kwargs = tinyllama
    compiled = fxforge.compile(model, (), kwargs, passes="quantize(bits=4,method=gptq,damp=0.1)",
                               calibration=calibration_for(kwargs, 2))
    record = compiled.report["quantize"]
    assert record.sites == 15 and record.verified_against == "semantics"
    assert record.verified_shapes == SHAPES and record.check_error <= 1e-5
    assert record.rel_l2 > 0.0


def test_w8a8_compiles_with_verification_against_its_activation_quantizing_semantics(tinyllama):
    model, kwargs = tinyllama
    compiled = fxforge.compile(model, (), kwargs, passes="quantize_dynamic")
    record = compiled.report["quantize_dynamic"]
    assert record.sites == 14 and record.verified_against == "semantics"
    assert record.verified_shapes == SHAPES and record.check_error <= 1e-5
    assert 0 < record.rel_l2 < 0.1  # int8 activations and weights: small but real loss


def test_exact_passes_are_still_verified_against_the_graph_before():
    record = _record(get_pass_class("fuse_rms_norm")())
    assert record.verified_against == "graph before" and record.max_error <= 1e-5 and record.rel_l2 <= 1e-6


# --------------------------------------------------------------------------- bugs are rejected


@pytest.mark.parametrize("broken, fragment", [
    (OffByOneGroupQuantize(bits=4), "at input shape 2x16, 2x16"),
    (WrongAtBatch3Quantize(bits=4), "at input shape 3x12, 3x12"),  # exact at the example batch
    (InvertedMaskSparsify(method="magnitude"), "does not compute what it claims"),
    (MisalignedPrune(method="magnitude", ratio=0.25), "does not compute what it claims"),
], ids=["off-by-one-group", "wrong-at-batch-5", "inverted-mask", "misaligned-prune"])
def test_broken_rewrites_are_rejected_and_named(broken, fragment):
    _, _, gm, ctx = traced_tinyllama()
    with pytest.raises(PassError) as info:
        run_pass(broken, gm, ctx)
    assert info.value.pass_name == broken.name
    assert f"pass '{broken.spec()}'" in str(info.value) and fragment in str(info.value)
    assert "bug in the pass" in str(info.value)


def test_the_batch_3_bug_is_invisible_at_the_example_inputs():
    """Why the second shape matters: unverified, the buggy graph equals the honest one at batch 2."""
    _, _, gm, ctx = traced_tinyllama()
    buggy = run_pass(WrongAtBatch3Quantize(bits=4), gm, ctx, verify=False)
    honest = run_pass(Quantize(bits=4), gm, ctx, verify=False)
    assert outputs_equal(buggy, honest, ctx.example_inputs)
    second = second_shape_inputs(gm, ctx.example_inputs)
    assert second[0].shape == (3, 12)
    assert not outputs_equal(buggy, honest, second)


def test_honest_sparsify_and_prune_pass_with_their_loss_reported():
    for p in (Sparsify(method="magnitude"), Prune(method="magnitude", ratio=0.25)):
        record = _record(p)
        assert record.verified_against == "semantics" and record.check_error <= 1e-5, p.spec()
        assert record.rel_l2 > 0.0


# --------------------------------------------------------------------------- max_loss


def test_max_loss_on_compile_rejects_a_pass_with_a_clear_message():
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    with pytest.raises(PassError) as info:
        fxforge.compile(mlp, (torch.randn(4, 128),), passes="quantize(bits=4)", max_loss=0.01)
    message = str(info.value)
    assert info.value.pass_name == "quantize"
    assert "lost more than max_loss allows" in message and "rel_l2 = " in message and "> 0.01" in message


def test_a_pass_max_loss_overrides_the_pipeline_bound():
    _, _, gm, ctx = traced_tinyllama()
    out, report = Pipeline([Quantize(bits=4, max_loss=1.0)]).run(gm, ctx, max_loss=0.01)
    assert report["quantize"].rel_l2 > 0.01
    with pytest.raises(PassError, match=r"cosine = .* < 0\.99999"):
        Pipeline([Quantize(bits=4, max_loss={"min_cosine": 0.99999})]).run(gm, ctx)


def test_prune_max_rel_error_still_bounds_the_loss():
    _, _, gm, ctx = traced_tinyllama()
    with pytest.raises(PassError, match="rel_l2"):
        run_pass(Prune(method="magnitude", ratio=0.5, max_rel_error=1e-3), gm, ctx)


# --------------------------------------------------------------------------- the machinery


def test_second_shape_grows_the_batch_and_trims_the_sequence_keeping_inputs_valid():
    _, kwargs, gm, ctx = traced_tinyllama()
    ids, mask = second_shape_inputs(gm, ctx.example_inputs)
    assert ids.shape == mask.shape == (3, 12)
    assert torch.equal(ids[2], kwargs["input_ids"][0, :12])  # rows tiled: row i is example row i mod 2
    assert torch.equal(mask[:2], kwargs["attention_mask"][:, :12])


def test_a_static_graph_is_verified_once_and_says_so():
    from fxforge.ir.trace import trace

    mlp = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    x = torch.randn(3, 128)
    gm = trace(mlp, (x,), dynamic_shapes=None)
    assert second_shape_inputs(gm, (x,)) is None
    report = PipelineReport()
    run_pass(Quantize(bits=4), gm, PassContext(example_inputs=(x,)), report=report)
    assert report.records[0].verified_shapes == ["3x128"]
    assert "static graph" in report.records[0].verification_note


def test_the_reference_shares_untouched_tensors_and_leaves_the_graph_before_alone():
    _, _, gm, ctx = traced_tinyllama()
    name = "model.layers.0.mlp.down_proj.weight"
    original = get_attr(gm, name).clone()
    reference = reference_graph(gm, Semantics(weights={name: torch.zeros_like(original)}))
    assert get_attr(reference, "model.layers.0.mlp.up_proj.weight") is get_attr(gm, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(get_attr(gm, name), original) and not get_attr(reference, name).any()
    assert not torch.equal(run_graph(reference, ctx.example_inputs)[0], run_graph(gm, ctx.example_inputs)[0])


def test_an_unverifiable_claim_skips_the_bug_check_says_why_and_still_measures_loss():
    import dataclasses

    from fxforge.ir.graph import set_attr
    from fxforge.ir.trace import trace
    from fxforge.passes.base import Pass, PassResult

    @dataclasses.dataclass(frozen=True)
    class HalvesAWeight(Pass):
        name = "halves_a_weight"

        def run(self, gm, ctx):
            set_attr(gm, "0.weight", get_attr(gm, "0.weight").detach() * 0.5)
            return PassResult(gm, sites=1, semantics=Semantics(unverified="no exact claim exists"))

    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    x = torch.randn(2, 16)
    report = PipelineReport()
    run_pass(HalvesAWeight(), trace(mlp, (x,), dynamic_shapes=None), PassContext(example_inputs=(x,)), report=report)
    record = report.records[0]
    assert record.verified_against == "nothing (loss only)" and "no exact claim exists" in record.verification_note
    assert record.rel_l2 > 0.01
