"""prune and sparsify calibrate through the calibration engine (fxforge/calibration): their
statistics match the old interpreter capture (tests/capture_reference.py, float64 over the
whole graph) within 1e-5 relative wherever the math is the same.

* prune (flap, wanda_sp) sweeps every block without rewriting (scores compete globally), so
  its statistics are the old ones on the same graph, and so are the unit scores and choices;
* sparsify (wanda, dsnot) rewrites block by block: block i is calibrated on the graph whose
  blocks before i are already sparse. The reference is the old capture on exactly that graph.
"""
import copy

import pytest
import torch
from capture_reference import capture_input_stats_reference

import fxforge.passes.prune.sparsify as sparsify_module
from fxforge.ir.depgraph import analyze
from fxforge.ir.graph import get_attr, linear_sites, set_attr
from fxforge.passes.prune.prune import Prune
from fxforge.passes.prune.scoring import Candidate, select_units
from fxforge.passes.prune.sparsify import MASKS_META, Sparsify
from fxforge.passes.prune.surgery import linear_nodes_by_weight

TOLERANCE = 1e-5


def relative_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """max |new - old| / max |old| (the scale of the statistic, so near-zero entries do not blow up)."""
    old = old.double()
    return float((new.double() - old).abs().max() / old.abs().max().clamp_min(1e-30))


def _batches(gm, ctx, limit=16):
    return list(ctx.calibration_batches(gm, limit, pass_name="reference"))


@pytest.mark.parametrize("method", ["flap", "wanda_sp"])
def test_prune_statistics_scores_and_choices_match_the_old_capture(tiny_llama, method):
    gm, ctx, _ = tiny_llama
    gm = copy.deepcopy(gm)
    pass_ = Prune(method=method, ratio=0.3)
    chosen = pass_.method_object()
    groups, _ = pass_._candidate_groups(analyze(gm).groups)
    new = pass_._calibrate(gm, groups, ctx, chosen)

    by_weight = linear_nodes_by_weight(gm)
    old_by_node = capture_input_stats_reference(gm, [by_weight[name][0] for name in new], _batches(gm, ctx))
    old = {name: old_by_node[by_weight[name][0].name] for name in new}
    assert len(new) == 14  # every linear member of the heads/channels groups of 2 layers
    for name in new:
        for statistic in ("mean", "fluctuation", "norm"):
            error = relative_error(getattr(new[name], statistic), getattr(old[name], statistic))
            assert error <= TOLERANCE, (name, statistic, error)

    new_candidates, old_candidates = [], []
    for group in groups:
        new_scores, old_scores = chosen.score_group(gm, group, new), chosen.score_group(gm, group, old)
        if isinstance(old_scores, str):
            assert new_scores == old_scores
            continue
        assert relative_error(new_scores, old_scores) <= TOLERANCE, group.kind
        new_candidates.append(Candidate(group, new_scores))
        old_candidates.append(Candidate(group, old_scores))
    assert new_candidates
    allocation = chosen.allocation
    assert select_units(new_candidates, 0.3, allocation) == select_units(old_candidates, 0.3, allocation)


@pytest.mark.parametrize("method", ["wanda", "dsnot"])
def test_sparsify_blocks_are_calibrated_on_the_sparse_blocks_before_them(tiny_llama, monkeypatch, method):
    gm, ctx, _ = tiny_llama
    original = copy.deepcopy(gm)
    seen: list[dict[str, dict[str, torch.Tensor]]] = []  # per rewritten block: layer -> statistics given
    engine_calibrate = sparsify_module.calibrate

    def recording(gm_, ctx_, requests, rewrite_block, **kwargs):
        def record_then_rewrite(block):
            seen.append({node.name: {"norm": block.stats(node).norm.clone(),  # DSnoT's E[xxᵀ] too
                                     **({"hessian": block.stats(node).hessian.clone()}
                                        if "gram" in block.stats(node) else {})} for node in block.nodes})
            rewrite_block(block)
        return engine_calibrate(gm_, ctx_, requests, record_then_rewrite, **kwargs)

    monkeypatch.setattr(sparsify_module, "calibrate", recording)
    work = copy.deepcopy(gm)
    Sparsify(method=method, sparsity=0.5).run(work, ctx)
    masks = work.meta[MASKS_META]
    assert [len(block) for block in seen] == [7, 7]  # two decoder blocks, 7 linears each

    weight_of = {s.node.name: s.weight_name for s in linear_sites(original)}
    batches = _batches(original, ctx)
    sparse_before: list[str] = []
    for index, block in enumerate(seen):
        reference = copy.deepcopy(original)  # dense, except the blocks already rewritten
        for name in sparse_before:
            set_attr(reference, name, get_attr(reference, name) * masks[name])
        nodes = [n for n in reference.graph.nodes if n.name in block]
        old = capture_input_stats_reference(reference, nodes, batches, second_moment=True)
        for node_name, new in block.items():
            assert relative_error(new["norm"], old[node_name].norm) <= TOLERANCE, (node_name, "norm")
            assert ("hessian" in new) == (method == "dsnot")
            if "hessian" in new:
                assert relative_error(new["hessian"], old[node_name].second_moment) <= TOLERANCE, (node_name, "E[xxᵀ]")
        if index:  # the sparse first block changed what the second one sees
            dense = capture_input_stats_reference(original, [n for n in original.graph.nodes if n.name in block],
                                                  batches)
            changed = max(relative_error(block[n]["norm"], dense[n].norm) for n in block)
            assert changed > 1e-3
        sparse_before += [weight_of[n] for n in block]
