"""EVA calibrates through the calibration engine (an EvaObserver at each layer's input, one sweep
over tiny-llama's blocks): with eva_tau=1 (no layer stops early) its PCA equals the old
interpreter-based one (tests/capture_reference.py) within 1e-5; with eva_tau < 1 a converged
layer stops accumulating, as PEFT's EVA removes a converged layer's hook."""
import pytest
import torch
from capture_reference import eva_pca_reference
from testing_utils import traced_zoo

from fxforge.ir.graph import linear_sites
from fxforge.passes.adapters.eva import Eva, redistribute_ranks
from fxforge.passes.context import PassContext

RANK = 4


@pytest.fixture(scope="module")
def llama():
    zoo, gm = traced_zoo("tiny-llama")
    g = torch.Generator().manual_seed(3)
    ids = zoo.kwargs["input_ids"]
    calibration = [{**zoo.kwargs, "input_ids": torch.randint(0, 64, ids.shape, generator=g)} for _ in range(6)]
    ctx = PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=calibration,
                      progress=lambda it=None, **_: it)
    return gm, ctx


def test_eva_pca_matches_the_old_capture(llama):
    gm, ctx = llama
    sites = linear_sites(gm)
    new = Eva(eva_tau=1.0).prepare(gm, sites, ctx, RANK)
    old = eva_pca_reference(gm, sites, ctx.calibration_batches(gm, 16, pass_name="reference"))
    assert set(new) == set(old) and len(new) == 14
    for path, data in new.items():
        components, ratios = old[path]
        offered = 2 * RANK
        torch.testing.assert_close(data["components"][:offered].abs(), components[:offered].abs(),
                                   rtol=0, atol=1e-5)  # eigenvectors up to sign
        cosines = (data["components"][:offered] * components[:offered]).sum(-1).abs()
        assert cosines.min() >= 1 - 1e-5, (path, cosines)
        assert data["batches"] == 6 and not data["converged"]
    ranks = redistribute_ranks({path: ratios[:2 * RANK] for path, (_, ratios) in old.items()}, RANK * len(sites))
    assert {path: data["rank"] for path, data in new.items()} == ranks  # the same global redistribution


def test_a_converged_layer_stops_accumulating(llama):
    gm, ctx = llama
    sites = linear_sites(gm)
    data = Eva(eva_tau=1e-6).prepare(gm, sites, ctx, RANK)  # any |cosine| counts: converged at the 2nd batch
    assert {d["batches"] for d in data.values()} == {2}
    assert all(d["converged"] for d in data.values())
    assert sum(d["rank"] for d in data.values()) == RANK * len(sites)  # the global budget is kept
