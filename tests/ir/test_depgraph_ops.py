"""ir.depgraph rules for the ops the architecture sweep met (stack, unbind, view_as, repeat,
repeat_interleave, expand_as, type_as, logsumexp, vector norm, pad, topk, depthwise conv): the
channels flowing through each are found, and `prune` removes some of them with the graph still
computing exactly the original with those channels zeroed (the pass verifies that claim)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxforge.ir.depgraph import analyze
from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class


class _Through(nn.Module):
    """x -> a (8 -> 16 channels) -> op -> b: the 16 channels of `a` must survive `op`."""

    def __init__(self, op, width_after=16):
        super().__init__()
        self.op = op
        self.a, self.c = nn.Linear(8, 16), nn.Linear(8, 16)
        self.b = nn.Linear(width_after, 4)

    def forward(self, x):
        return self.b(self.op(self, x, self.a(x)))


def _stack(m, x, h):  # an interleaved-rotary-style pair: (…, 16, 2) flattened to 32
    return torch.stack([h, -h], dim=-1).flatten(-2)


def _unbind(m, x, h):
    p, q = h.view(x.shape[0], 2, 8).unbind(1)
    return p * q


def _depthwise(m, x, h):  # Mamba's short causal conv over the sequence, one filter per channel
    y = F.conv1d(h.transpose(1, 2), m.conv_w, m.conv_b, padding=2, groups=16)
    return y[..., :x.shape[1]].transpose(1, 2)


CASES = {
    "stack": (_stack, 32),
    "unbind": (_unbind, 8),
    "view_as": (lambda m, x, h: h.view_as(m.c(x)) + m.c(x), 16),
    "repeat": (lambda m, x, h: h.unsqueeze(-1).repeat(1, 1, 2).flatten(1), 32),
    "repeat_interleave": (lambda m, x, h: h.view(-1, 4, 4).repeat_interleave(2, dim=1).flatten(1), 32),
    "expand_as": (lambda m, x, h: x.sum(-1, keepdim=True).expand_as(h) * h, 16),
    "type_as": (lambda m, x, h: h.type_as(x), 16),
    "logsumexp": (lambda m, x, h: h - h.logsumexp(0, keepdim=True), 16),
    "vector_norm": (lambda m, x, h: h / torch.linalg.vector_norm(h, dim=0, keepdim=True), 16),
    "pad": (lambda m, x, h: F.pad(h.unsqueeze(1), (0, 0, 1, 0)).sum(1), 16),
    "depthwise_conv": (_depthwise, 16),
    "reshape_as": (lambda m, x, h: h.reshape_as(m.c(x)) + m.c(x), 16),
    # a mean over the pruned channels (an RMSNorm over all heads): the surgery rescales it
    "mean_over_channels": (lambda m, x, h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), 16),
    # aten.rms_norm / softmax over each group of 4: the 4 groups are prunable, their insides not
    "rms_norm_per_group": (lambda m, x, h: F.rms_norm(h.view(-1, 4, 4), (4,)).flatten(1), 16),
    "softmax_per_group": (lambda m, x, h: h.view(-1, 4, 4).softmax(-1).flatten(1), 16),
    # inside each group of 4, positions reordered by an index (relative-position logits)
    "gather": (lambda m, x, h: h.view(-1, 4, 4).gather(
        -1, torch.arange(4).flip(0).expand(x.shape[0], 4, 4)).flatten(1), 16),
    # ConvBERT's unfold: channel c owns rows 3c .. 3c + 2
    "im2col": (lambda m, x, h: F.unfold(h.view(-1, 16, 1, 1), (3, 1), padding=(1, 0)).flatten(1), 48),
}


def _model(case):
    op, width = CASES[case]
    torch.manual_seed(0)
    model = _Through(op, width).eval()
    if case == "depthwise_conv":
        model.conv_w = nn.Parameter(torch.randn(16, 1, 3))
        model.conv_b = nn.Parameter(torch.randn(16))
    x = torch.randn(3, 5, 8) if case == "depthwise_conv" else torch.randn(3, 8)
    return model, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_channels_through_op_are_pruned_exactly(case):
    model, x = _model(case)
    gm = trace(model, (x,), {}, dynamic_shapes=None)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    a_groups = [g for g in analyze(gm).groups if g.member("a.weight") and g.units > 1]
    # the channels of `a` (or, split by a reshape, one factor of them) are prunable
    assert any(g.prunable for g in a_groups), [g.describe() for g in a_groups]
    report = PipelineReport()
    pruner = get_pass_class("prune")(method="magnitude", ratio=0.3, structures=("heads", "channels"))
    before = sum(p.numel() for p in gm.parameters())
    out = run_pass(pruner, gm, PassContext(example_inputs=(x,)), report=report)  # verified exactly
    assert report.records[-1].sites >= 1
    assert out.a.weight.shape[0] < 16 and sum(p.numel() for p in out.parameters()) < before
    assert out(x)[0].shape == model(x).shape


@pytest.mark.parametrize("op", [lambda h: F.layer_norm(h, (16,)), lambda h: F.rms_norm(h, (16,)),
                                lambda h: h.softmax(-1), lambda h: h - h.amax(-1, keepdim=True)],
                         ids=["layer_norm", "rms_norm", "softmax", "amax"])
def test_width_dependent_reduction_over_channels_blocks_them(op):
    """Removing channels a norm/softmax/max runs over is not zeroing them (the result depends on
    the width): the group is blocked, naming the node, instead of claiming what it does not compute."""
    model = _Through(lambda m, x, h: op(h), 16).eval()
    gm = trace(model, (torch.randn(3, 8),), {}, dynamic_shapes=None)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    group = next(g for g in analyze(gm).groups if g.member("a.weight") and g.units == 16)
    assert group.kind == "channels" and not group.prunable and "normalizes or reduces" in group.blocked


def test_mean_over_pruned_channels_is_rescaled_once():
    model, x = _model("mean_over_channels")
    gm = trace(model, (x,), {}, dynamic_shapes=None)
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    report = PipelineReport()
    out = run_pass(get_pass_class("prune")(method="magnitude", ratio=0.3), gm,
                   PassContext(example_inputs=(x,)), report=report)  # verified: == zeroed graph
    assert report.records[-1].notes["rescaled_means"] == 1
    means = [n for n in out.graph.nodes if n.target == torch.ops.aten.mean.dim]
    assert len(means) == 1 and [u.target for u in means[0].users] == [torch.ops.aten.mul.Tensor]


def test_topk_over_channels_blocks_them_with_a_reason():
    model = _Through(lambda m, x, h: h.topk(4, dim=-1).values, 4).eval()
    gm = trace(model, (torch.randn(3, 8),), {}, dynamic_shapes=None)
    group = next(g for g in analyze(gm).groups if g.member("a.weight") and g.units == 16)
    assert not group.prunable and "top-k" in group.blocked
