"""Pass `sparsify`: exact sparsity and N:M patterns, recorded masks, DSnoT keeping the pattern,
option validation. The perplexity comparisons on code-lm live in test_prune_code_lm.py (one
trace of the model for both passes)."""
import pytest
import torch

from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, linear_sites
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.prune.sparsify import (MASKS_META, Sparsify, dsnot_refine, mask_n_m,
                                           mask_unstructured, reapply_masks)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    gm, ctx, _ = tiny_llama
    return gm, ctx


def _sparsify(setup, **options):
    gm, ctx = setup
    report = PipelineReport()
    out = run_pass(Sparsify(**options), gm, ctx, report=report)
    return out, report.records[-1]


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.5), "sparsity"), (dict(method="sparsegpt"), "method"),
    (dict(pattern="4:2"), "N:M"), (dict(pattern="half"), "N:M"), (dict(dsnot_cycles=-1), "dsnot_cycles"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Sparsify(**options)


def test_wanda_needs_calibration(llama):
    gm, ctx = llama
    with pytest.raises(PassError, match="calibration"):
        run_pass(Sparsify(method="wanda"), gm, PassContext(example_inputs=ctx.example_inputs))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "dsnot"])
def test_unstructured_sparsity_is_exact_and_recorded(llama, method):
    out, record = _sparsify(llama, method=method, sparsity=0.5)
    sites = linear_sites(out)
    assert record.sites == len(sites) == 14  # 7 linears x 2 layers, the LM head left out
    masks = out.meta[MASKS_META]
    for site in sites:
        w, mask = get_attr(out, site.weight_name), masks[site.weight_name]
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert torch.all(w[~mask] == 0)
        if method == "magnitude":
            assert (~mask).sum() == w.numel() // 2  # per layer
        else:
            assert torch.all((~mask).sum(1) == w.shape[1] // 2)  # per output row
    assert record.notes["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "dsnot"])
def test_2_4_every_block_has_exactly_two_nonzeros(llama, method):
    out, record = _sparsify(llama, method=method, pattern="2:4")
    for site in linear_sites(out):
        w = get_attr(out, site.weight_name)
        nonzeros = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(nonzeros == 2), site.module_path


def test_masks_survive_and_can_be_reapplied(llama):
    out, _ = _sparsify(llama, method="magnitude", sparsity=0.5, targets=("mlp.*",))
    name = "model.layers.0.mlp.up_proj.weight"
    assert set(out.meta[MASKS_META]) == {f"model.layers.{i}.mlp.{p}_proj.weight"
                                         for i in range(2) for p in ("gate", "up", "down")}
    with torch.no_grad():
        get_attr(out, name).add_(1.0)  # e.g. a fine-tuning step
    assert reapply_masks(out) == 6
    assert torch.all(get_attr(out, name)[~out.meta[MASKS_META][name]] == 0)


def test_dsnot_reduces_the_reconstruction_error_and_keeps_counts():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    x = torch.randn(500, 32) @ torch.randn(32, 32) * 0.3 + torch.randn(32)  # correlated, non-zero mean
    second_moment = (x.T @ x / x.shape[0]).double()
    scores = w.abs() * x.norm(dim=0)

    def objective(m):  # mean squared output error of the pruned weights, over the inputs x
        return ((x @ (w * ~m).T) ** 2).mean(0)

    for mask, block in ((mask_unstructured(scores, 0.6, per_row=True), None), (mask_n_m(scores, 2, 4), 4)):
        refined = dsnot_refine(w, mask, second_moment, cycles=50, block=block)
        assert torch.all(objective(refined) <= objective(mask) * (1 + 1e-5))
        assert (objective(refined) < objective(mask) * 0.9).any()
        assert torch.equal(refined.sum(1), mask.sum(1))
        if block:
            assert torch.all(refined.reshape(16, -1, 4).sum(-1) == 2)
