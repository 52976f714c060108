"""The block-by-block calibration engine against a plain whole-graph capture on zoo models."""
import gc

import pytest
import torch
from calibration_helpers import random_batches
from testing_utils import traced_zoo

from fxforge.calibration.blocks import is_computation, split_blocks
from fxforge.calibration.engine import BoundaryStore, calibrate, run_segment
from fxforge.calibration.observers import live_statistics
from fxforge.ir.graph import get_attr, linear_sites
from fxforge.passes.context import PassContext

MODELS = {"tiny-llama": ("model.layers", 2), "tiny-gpt2": ("transformer.h", 2), "tiny-bert": ("encoder.layer", 2)}


def context(zoo, gm, count=4, seed=1):
    return PassContext(example_inputs=tuple(zoo.kwargs.values()), calibration=random_batches(zoo, gm, count, seed),
                       progress=lambda it=None, **kw: it)


class _PlainCapture(torch.fx.Interpreter):
    """The reference: one whole-graph run per batch, float64 sums at every linear's input."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes = {n.name for n in nodes}
        self.gram, self.abs_sum, self.rows = {}, {}, {}

    def run_node(self, n):
        if n.name in self.nodes:
            x = self.env[n.args[0]].detach().reshape(-1, self.env[n.args[0]].shape[-1]).double()
            self.gram[n.name] = self.gram.get(n.name, 0) + x.T @ x
            self.abs_sum[n.name] = self.abs_sum.get(n.name, 0) + x.abs().sum(0)
            self.rows[n.name] = self.rows.get(n.name, 0) + x.shape[0]
        return super().run_node(n)


def plain_capture(gm, ctx, nodes):
    capture = _PlainCapture(gm, nodes)
    with torch.no_grad():
        for flat in ctx.calibration_batches(gm):
            capture.run(*flat)
    return capture


def relative(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_found_and_segments_compute_the_graph(name):
    zoo, gm = traced_zoo(name)
    plan = split_blocks(gm)
    container, count = MODELS[name]
    assert plan.container == container
    assert [b.name for b in plan.blocks] == [f"{container}.{i}" for i in range(count)]
    assert plan.segments[0].kind == "prologue" and plan.segments[-1].kind == "epilogue"
    # every computation node in exactly one segment, in graph order
    assert [n for s in plan.segments for n in s.nodes] == [n for n in gm.graph.nodes if is_computation(n)]
    # each block reads the hidden state from the segment before it and hands one on
    for block in plan.blocks:
        assert any(n in plan.segments[block.index - 1].nodes for n in plan.inputs(block))
        assert plan.outputs(block)
    # running the segments one after another with only the boundary values computes the graph
    flat = list(zoo.kwargs.values())
    env = {n.name: v for n, v in zip([n for n in gm.graph.nodes if n.op == "placeholder"], flat)}
    with torch.no_grad():
        for segment in plan.segments:
            run_segment(gm, segment.nodes, env)
            later = {n.name for s in plan.segments[segment.index + 1:] for n in s.nodes}
            env = {k: v for k, v in env.items() if _read_later(gm, k, later)}
        expected = gm(*flat)
    output = gm.graph.output_node()
    got = [env[a.name] for a in output.args[0]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def _read_later(gm, name, later):
    node = next(n for n in gm.graph.nodes if n.name == name)
    return any(u.name in later or u.op == "output" for u in node.users)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_statistics_equal_a_plain_whole_graph_capture(name):
    zoo, gm = traced_zoo(name)
    ctx = context(zoo, gm)
    sites = linear_sites(gm, include_lm_head=True)
    result = calibrate(gm, ctx, {s.node: ("gram", "abs_mean") for s in sites}, pass_name="test")
    reference = plain_capture(gm, ctx, [s.node for s in sites])
    assert result.batches == 4 and set(result.statistics) == {s.node.name for s in sites}
    for site in sites:
        stats = result.statistics[site.node.name]
        assert stats.rows == reference.rows[site.node.name]
        assert relative(stats.gram, reference.gram[site.node.name]) <= 1e-5
        assert relative(stats.mean_abs, reference.abs_sum[site.node.name] / stats.rows) <= 1e-5
        assert stats.gram.dtype == torch.float32


def test_shared_input_gets_one_observer_and_only_one_block_is_alive():
    zoo, gm = traced_zoo("tiny-llama")
    ctx = context(zoo, gm)
    sites = [s for s in linear_sites(gm) if ".layers." in s.module_path]
    gc.collect()
    before = live_statistics()
    seen = []

    def rewrite(block):
        stats = {s.module_path.rsplit(".", 1)[-1]: block.stats(s.node) for s in sites if s.node in block.nodes}
        assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"]
        assert stats["gate_proj"] is stats["up_proj"]
        assert stats["o_proj"] is not stats["q_proj"] and stats["down_proj"] is not stats["up_proj"]
        # q/k/v, o, gate/up, down: four distinct inputs, and nothing left of the previous block
        seen.append(live_statistics() - before)

    calibrate(gm, ctx, {s.node: ("gram",) for s in sites}, rewrite, pass_name="test")
    assert seen == [4, 4]
    gc.collect()
    assert live_statistics() == before


def _down_proj(gm, layer):
    return next(s for s in linear_sites(gm) if s.module_path == f"model.layers.{layer}.mlp.down_proj")


def test_later_blocks_see_the_rewritten_earlier_blocks():
    zoo, gm = traced_zoo("tiny-llama")
    ctx = context(zoo, gm)
    target = _down_proj(gm, 1)
    untouched = plain_capture(gm, ctx, [target.node]).gram[target.node.name]

    def rewrite(block):  # a rewrite that changes block 0's output: down_proj's weight tripled
        if block.name == "model.layers.0":
            get_attr(gm, _down_proj(gm, 0).weight_name).data.mul_(3.0)

    grams = {}

    def record(block):
        rewrite(block)
        if block.name == "model.layers.1":
            grams["seq"] = block.stats(target.node).gram.clone()

    calibrate(gm, ctx, {_down_proj(gm, 0).node: ("gram",), target.node: ("gram",)}, record, pass_name="test")
    # the reference: a whole-graph capture of the graph with block 0 rewritten
    rewritten = plain_capture(gm, ctx, [target.node]).gram[target.node.name]
    assert relative(grams["seq"], rewritten) <= 1e-5
    assert relative(grams["seq"], untouched) > 1e-3


def test_offloaded_boundaries_give_identical_statistics():
    zoo, gm = traced_zoo("tiny-gpt2")
    ctx = context(zoo, gm)
    sites = linear_sites(gm)
    requests = {s.node: ("gram", "moments", "samples") for s in sites}
    memory = calibrate(gm, ctx, requests, pass_name="test")
    disk = calibrate(gm, ctx, requests, pass_name="test", offload_bytes=0)
    assert disk.offloaded and not memory.offloaded
    for name, stats in memory.statistics.items():
        assert torch.equal(stats.gram, disk.statistics[name].gram)
        assert torch.equal(stats.norm, disk.statistics[name].norm)
        assert torch.equal(stats.sample(), disk.statistics[name].sample())


def test_boundary_store_spills_to_disk_past_its_threshold():
    store = BoundaryStore(3, offload_bytes=2 * 4 * 10)
    values = [{"h": torch.full((10,), float(i)), "n": i} for i in range(3)]
    store.put(0, values[0])
    store.put(1, values[1])
    assert not store.offloaded
    store.put(2, values[2])
    assert store.offloaded
    directory = store._dir.name
    for i in range(3):
        assert torch.equal(store.get(i)["h"], values[i]["h"]) and store.get(i)["n"] == i
    store.close()
    import os

    assert not os.path.exists(directory)


def test_requests_outside_the_graph_are_refused():
    zoo, gm = traced_zoo("tiny-gpt2")
    _, other = traced_zoo("tiny-gpt2")
    ctx = context(zoo, gm)
    with pytest.raises(ValueError, match="not a computation node of this graph"):
        calibrate(gm, ctx, {linear_sites(other)[0].node: ("gram",)}, pass_name="test")
    with pytest.raises(ValueError, match="unknown calibration statistic"):
        calibrate(gm, ctx, {linear_sites(gm)[0].node: ("hessian",)}, pass_name="test")
