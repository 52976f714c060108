"""Heads coupled across layers (BLOOM: one ALiBi bias, built per head and tiled per sample, read by
every layer): the coupled heads are one "heads" group (a projection's bias does not make it the
residual stream, nor does a 1-D per-head parameter), a repeat by the batch size does not block them, and `prune` removes the same
heads in every layer with the graph computing exactly the original with those heads zeroed."""
import pytest
import torch
from torch import nn

from fxforge.ir.depgraph import analyze
from fxforge.ir.graph import get_attr
from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class

HEADS, HEAD_DIM, WIDTH = 4, 4, 16


class _SharedBiasHeads(nn.Module):
    """Two attention-like layers whose heads all add one per-head bias, tiled over the batch."""

    def __init__(self):
        super().__init__()
        self.head_bias = nn.Parameter(torch.randn(HEADS, 1, 1))
        self.head_scale = nn.Parameter(torch.randn(HEADS))  # 1-D, one entry per head (Doge's A): no norm
        self.q = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))  # biased, like BLOOM's
        self.o = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))

    def forward(self, x):
        b, s, _ = x.shape
        bias = self.head_bias.repeat(b, 1, 1)  # (b * heads, 1, 1): a repeat by a symbolic count
        for q, o in zip(self.q, self.o):
            h = q(x).view(b, s, HEADS, HEAD_DIM).transpose(1, 2).reshape(b * HEADS, s, HEAD_DIM)
            h = torch.relu(h + bias).view(b, HEADS, s, HEAD_DIM) * self.head_scale.view(HEADS, 1, 1)
            h = h.transpose(1, 2).reshape(b, s, WIDTH)
            x = x + o(h)
        return x


@pytest.fixture(scope="module")
def graph():
    """(model, example input, canonical graph): traced once for the module."""
    torch.manual_seed(0)
    model = _SharedBiasHeads().eval()
    x = torch.randn(2, 5, WIDTH)
    gm = trace(model, (x,), {})  # dynamic batch and length: the repeat count is symbolic
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    return model, x, gm


def test_heads_shared_across_layers_are_one_prunable_heads_group(graph):
    _, _, gm = graph
    group = next(g for g in analyze(gm).groups if g.member("q.0.weight") and g.units == HEADS)
    assert group.kind == "heads" and group.prunable, group.describe()
    assert group.member("q.1.weight") and group.member("o.1.weight") and group.member("head_bias")
    assert group.member("head_scale")


def test_prune_removes_the_same_heads_in_every_layer_exactly(graph):
    model, x, gm = graph
    report = PipelineReport()
    pruner = get_pass_class("prune")(method="magnitude", ratio=0.3, structures=("heads",))
    out = run_pass(pruner, gm, PassContext(example_inputs=(x,)), report=report)  # verified exactly
    record = report.records[-1]
    assert record.sites == 1 and not record.skipped, (record.sites, record.skipped)
    w = {name: get_attr(out, name) for name in ("q.0.weight", "q.1.weight", "o.0.weight", "o.1.weight", "head_bias", "head_scale")}
    kept = w["q.0.weight"].shape[0] // HEAD_DIM
    assert 1 <= kept < HEADS
    assert w["q.1.weight"].shape[0] == w["o.0.weight"].shape[1] == w["o.1.weight"].shape[1] == kept * HEAD_DIM
    assert w["head_bias"].shape[0] == w["head_scale"].shape[0] == kept
    # numerics at another batch size: the original with the removed heads' rows/columns zeroed
    keep_rows = torch.cat([torch.arange(HEAD_DIM) + h * HEAD_DIM for h in range(HEADS)
                           if any(torch.equal(w["q.0.weight"][k * HEAD_DIM:(k + 1) * HEAD_DIM],
                                              model.q[0].weight[h * HEAD_DIM:(h + 1) * HEAD_DIM])
                                  for k in range(kept))])
    assert len(keep_rows) == kept * HEAD_DIM
    zeroed = _SharedBiasHeads().eval()
    zeroed.load_state_dict(model.state_dict())
    drop = torch.tensor([i for i in range(WIDTH) if i not in set(keep_rows.tolist())])
    with torch.no_grad():
        for layer in range(2):
            zeroed.q[layer].weight[drop] = 0
            zeroed.q[layer].bias[drop] = 0
            zeroed.o[layer].weight[:, drop] = 0
    x3 = torch.randn(3, 7, WIDTH)
    got = out(x3)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, zeroed(x3), rtol=1e-5, atol=1e-5)
