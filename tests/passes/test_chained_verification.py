"""Consecutive exact passes are verified with one check (passes/chained_verification.py), and a
wrong pass anywhere in such a chain is still rejected, named and rolled back."""
from dataclasses import dataclass

import pytest
import torch
from runtime.fused_code_lm import fused_graph
from testing_utils import traced_zoo

import fxforge.passes.verification as verification
from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, linear_sites, set_attr
from fxforge.ir.verify import Tolerance
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.chained_verification import chain_tolerance
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import Pipeline, PipelineReport

aten = torch.ops.aten


@dataclass(frozen=True)
class DoubleNegate(Pass):
    """Exact: y -> -(-y) after the first linear."""

    name = "double_negate"

    def run(self, gm, ctx):
        site = linear_sites(gm)[0]
        with gm.graph.inserting_after(site.node):
            neg = gm.graph.call_function(aten.neg.default, (site.node,))
        with gm.graph.inserting_after(neg):
            back = gm.graph.call_function(aten.neg.default, (neg,))
        site.node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not neg)
        return PassResult(gm, sites=1)


@dataclass(frozen=True)
class ScaleFirstWeight(Pass):
    """Deliberately wrong while claiming exactness: scales the first layer's weight."""

    name = "scale_first_weight"
    factor: float = 3.0

    def run(self, gm, ctx):
        site = linear_sites(gm)[0]
        set_attr(gm, site.weight_name, get_attr(gm, site.weight_name) * self.factor)
        return PassResult(gm, sites=1)


@dataclass(frozen=True)
class Crash(Pass):
    name = "crash_after"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


@pytest.fixture()
def llama():
    zoo, gm = traced_zoo("tiny-llama")
    return gm, PassContext(example_inputs=tuple(zoo.kwargs.values()))


def _counting_runs(monkeypatch):
    """Graphs run by verification, by graph: one entry per input set (a run_graph call, or each
    set of a run_graph_many call, which runs a graph at both shapes together)."""
    runs = []
    real, real_many = verification.run_graph, verification.run_graph_many

    def counted(gm, inputs):
        runs.append(gm)
        return real(gm, inputs)

    def counted_many(gm, input_sets):
        runs.extend([gm] * len(input_sets))
        return real_many(gm, input_sets)

    monkeypatch.setattr(verification, "run_graph", counted)
    monkeypatch.setattr(verification, "run_graph_many", counted_many)
    return runs


def test_a_chain_of_exact_passes_is_checked_once(llama, monkeypatch):
    gm, ctx = llama
    runs = _counting_runs(monkeypatch)
    result, report = Pipeline([DoubleNegate(), DoubleNegate(), DoubleNegate()]).run(gm, ctx)
    # the graph before at two shapes, the last result at two shapes: not each pass's result
    assert len(runs) == 4 and runs.count(result) == 2 and runs.count(gm) == 2
    assert [r.name for r in report.records] == ["double_negate"] * 3
    for record in report.records:
        assert record.verified_against == "graph before" and len(record.verified_shapes) == 2
        assert "verified as one chain" in record.verification_note and record.max_error <= 1e-6
    assert report.records[-1].verify_seconds > 0


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_wrong_pass_anywhere_in_a_chain_is_named_and_rolled_back(llama, where):
    gm, ctx = llama
    passes: list[Pass] = [DoubleNegate(), DoubleNegate()]
    passes.insert(where, ScaleFirstWeight())
    report = PipelineReport()
    code, weights = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(PassError) as info:
        Pipeline(passes).run(gm, ctx, report=report)
    assert info.value.pass_name == "scale_first_weight"
    assert "rolled back" in str(info.value) and "first diverging node" in str(info.value)
    # the passes before it were verified and reported; it and the passes after it have no row
    assert [r.name for r in report.records] == ["double_negate"] * where
    assert all(r.verified_against == "graph before" for r in report.records)
    assert gm.code == code and all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())


def test_a_wrong_pass_is_named_before_the_crash_it_causes(llama):
    gm, ctx = llama
    with pytest.raises(PassError) as info:
        Pipeline([DoubleNegate(), ScaleFirstWeight(), Crash()]).run(gm, ctx)
    assert info.value.pass_name == "scale_first_weight"
    with pytest.raises(PassError, match="pass 'crash_after' failed"):
        Pipeline([DoubleNegate(), Crash()]).run(gm, ctx)  # the earlier pass is right: the crash is named


def test_a_wrong_pass_before_add_kv_cache_is_named():
    gm, ids = fused_graph(fused=True)
    ctx = PassContext(example_inputs=(ids[:, :10],))
    with pytest.raises(PassError) as info:
        Pipeline([ScaleFirstWeight(factor=1.5), AddKvCache()]).run(gm, ctx)
    assert info.value.pass_name == "scale_first_weight"
    assert ctx.example_inputs[0].shape == (ids.shape[0], 10)  # rolled back: the inputs are the old ones


def test_add_kv_cache_closes_a_chain_and_checks_it_its_own_way():
    gm, ids = fused_graph(fused=True)
    ctx = PassContext(example_inputs=(ids[:, :10],))
    _, report = Pipeline([DoubleNegate(), AddKvCache()]).run(gm, ctx)
    first, cache = report.records
    assert "verified as one chain (double_negate, add_kv_cache)" in cache.verification_note
    assert first.verified_shapes == cache.verified_shapes and len(cache.verified_shapes) == 2
    assert cache.max_error <= 1e-4
    assert len(ctx.example_inputs) > 1  # verified: its new inputs (past keys/values) are the context's


def test_chain_tolerance_adds_bounds_every_pass_sets():
    tol = chain_tolerance([Tolerance(), Tolerance(max_abs=1e-4, rtol=1e-4)])
    assert tol.max_abs == pytest.approx(1.1e-4) and tol.rtol == pytest.approx(1.1e-4)
    # a bound only one pass sets says nothing about the other: none holds
    assert chain_tolerance([Tolerance(), Tolerance.lossy(max_rel=1e-3)]) is None
    both = chain_tolerance([Tolerance.lossy(min_cosine=0.999), Tolerance.lossy(min_cosine=0.999)])
    assert 0.99 < both.min_cosine < 0.999
