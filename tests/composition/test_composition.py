"""Issue 18's composition matrix: every ordered pair of passes on a GPT-2, a Llama and a BERT model.

Expectations come from `composition/results.json` (regenerate with `composition/run_matrix.py`,
render docs/composition.md with `composition/render_docs.py`). The default run is cheap:

- structural: every pair of every model has a recorded cell, none is silent (zero sites with no
  error and no reason), every up-front refusal names both passes, and docs/composition.md is
  the rendering of the results;
- the pipeline's pair check (`passes/compatibility.py`), which needs no model run, is re-run for
  all pairs and must refuse exactly the recorded up-front refusals;
- a representative sample of cells is re-run (eager) and must reproduce its recorded status
  and site count: a composing pair of each kind (quantized base + adapters, sparsify then
  quantize, fused attention + KV cache, adapters merged), a runtime refusal, a skip.

FXFORGE_COMPOSE=all re-runs every cell, on every backend, against its record (hours on 2 cores:
that is run_matrix.py's job; this is its check). A recorded failure is a strict xfail with its
reason: a fix flips it to a failure ("now ...") until the results file is regenerated.
"""
from __future__ import annotations

import json
import os

import pytest

from composition.cells import BACKENDS, all_passes, pair_check, run_cell
from composition.models import MODELS
from composition.render_docs import DOCS, RESULTS, render

RESULTS_DATA: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
RUN_ALL = os.environ.get("FXFORGE_COMPOSE") == "all"
UPFRONT = "do not compose in this order"  # the pipeline's pair refusal (and "runs twice")
TWICE = "runs twice"

# (model, first, second): one cell of each kind of outcome, eager only (an ONNX export is ~10 s)
SAMPLE = [
    ("llama", "quantize", "add_adapters"),        # QLoRA: adapters beside fxforge::linear_wq
    ("llama", "sparsify", "quantize"),            # masks kept through quantization
    ("llama", "fuse_attention", "add_kv_cache"),  # the cache on the fused attention
    ("llama", "add_adapters", "merge_adapters"),
    ("llama", "add_kv_cache", "sparsify"),        # refused at run time: calibration no longer fits
]


def _cells() -> dict:
    return RESULTS_DATA.get("models", {})


def _recorded(model: str, a: str, b: str) -> dict:
    cell = _cells().get(model, {}).get(f"{a},{b}")
    if cell is None:
        pytest.fail(f"no recorded cell for {model} {a},{b}: run tests/composition/run_matrix.py "
                    f"--models {model} --rows {a} --cols {b}")
    return cell


# --------------------------------------------------------------------------- structural

def test_every_pair_of_every_model_has_a_cell():
    assert RESULTS_DATA.get("passes") == all_passes(), "a pass was added or removed: re-run run_matrix.py"
    missing = [f"{m} {a},{b}" for m in MODELS for a in all_passes() for b in all_passes()
               if f"{a},{b}" not in _cells().get(m, {})]
    assert not missing, f"{len(missing)} cells not recorded, e.g. {missing[:5]}"


def test_no_cell_is_silent():
    silent = [f"{m} {pair}" for m, entry in _cells().items() for pair, cell in entry.items()
              if cell["status"] == "silent"
              or cell["status"] in ("composes", "skips") and not cell["sites"][-1] and not cell["skipped"]]
    assert not silent, f"passes that rewrote nothing and said nothing: {silent}"


def test_every_refusal_says_why_and_every_backend_names_what_it_lacks():
    for model, entry in _cells().items():
        for pair, cell in entry.items():
            a, b = pair.split(",")
            if cell["status"] in ("refused", "n/a", "fail"):
                assert len(cell["text"]) > 20, (model, pair, cell)
            if UPFRONT in cell["text"]:
                assert a in cell["text"] and b in cell["text"], (model, pair, cell["text"])
            for backend, (status, text) in cell.get("backends", {}).items():
                assert backend in BACKENDS
                if backend == "triton" and status == "n/a" and "no Triton kernel" in text:
                    assert "fxforge::" in text  # names the op


def test_docs_are_current():
    assert DOCS.exists() and DOCS.read_text() == render(RESULTS_DATA), (
        "docs/composition.md is stale: python tests/composition/render_docs.py")


def test_the_pair_check_refuses_exactly_the_recorded_pairs():
    """The declarations (Pass.consumes/produces) give the same verdicts as the recorded run."""
    for model in MODELS:
        for a in all_passes():
            for b in all_passes():
                cell = _recorded(model, a, b)
                refusal = pair_check(model, a, b)
                recorded_upfront = cell["status"] == "refused" and (UPFRONT in cell["text"] or TWICE in cell["text"])
                assert (refusal is not None) == recorded_upfront, (model, a, b, cell, refusal)
                if refusal is not None:
                    assert f"'{b}" in str(refusal) or f"pass '{a}" in str(refusal)


# --------------------------------------------------------------------------- cells

def _params():
    if RUN_ALL:
        return [pytest.param(m, a, b, id=f"{m}:{a},{b}") for m in MODELS for a in all_passes()
                for b in all_passes()]
    return [pytest.param(*cell, id=f"{cell[0]}:{cell[1]},{cell[2]}") for cell in SAMPLE]


@pytest.mark.parametrize("model,a,b", _params())
def test_cell_reproduces_its_record(model, a, b):
    want = _recorded(model, a, b)
    got = run_cell(model, a, b, backends=BACKENDS if RUN_ALL else ("eager",))
    if want["status"] in ("fail", "silent"):
        if got.status == want["status"]:
            pytest.xfail(f"recorded {want['status']}: {want['text']}")
        pytest.fail(f"now {got.status} ({got.text}), recorded {want['status']}: regenerate results.json")
    assert got.status == want["status"], f"{got.text} (recorded: {want['text']})"
    assert got.sites == want["sites"], (got.sites, want["sites"])
    if RUN_ALL:
        for backend, (status, text) in want["backends"].items():
            assert got.backends[backend][0] == status, (backend, got.backends[backend], text)


def test_shift_add_and_quantize_follow_prune_rounded_to_their_groups():
    """prune leaves widths no group size divides (the recorded cells refuse, naming the fix);
    `round_to` a multiple of the group size makes the pair compose."""
    from composition.cells import _ctx, canonical
    from fxforge.passes.pipeline import Pipeline

    stage = canonical("llama")
    _, report = Pipeline("prune(ratio=0.25,round_to=32),shift_add(group_size=32)").run(
        stage.gm, _ctx(stage.example_inputs))
    assert report["prune"].sites >= 1
    assert report["shift_add"].sites == 7 and report["shift_add"].skipped == []  # every block linear
