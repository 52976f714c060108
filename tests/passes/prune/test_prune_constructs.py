"""`prune` on constructs of the architecture sweep, in one hand-built model: a layer whose weights
run in every block (ALBERT), a norm over all query heads (OLMoE's q_norm, BitNet's sub-norm) and
heads folded into the batch by a computed size (`view(b * heads, s, d)`, XGLM / GPT-NeoX-Japanese).
The pass verifies that the result computes the graph before with the removed units zeroed plus
FLAP's compensation; these check what the verification cannot see."""
import operator

import pytest
import torch
from torch import nn

from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.registry import get_pass_class

D, HEADS, VOCAB = 32, 4, 64


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.q_norm = nn.Parameter(torch.rand(D) + 0.5)
        self.up, self.down = nn.Linear(D, 64), nn.Linear(64, D)

    def heads(self, t, b, s):  # (b, s, D) -> (b * heads, s, head_dim)
        return t.view(b, s, HEADS, D // HEADS).transpose(1, 2).reshape(b * HEADS, s, D // HEADS)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.q_norm  # over all heads
        q, k, v = self.heads(q, b, s), self.heads(self.k(x), b, s), self.heads(self.v(x), b, s)
        att = torch.softmax(q @ k.transpose(1, 2) / (D // HEADS) ** 0.5, -1) @ v
        x = x + self.o(att.view(b, HEADS, s, D // HEADS).transpose(1, 2).reshape(b, s, D))
        return x + self.down(torch.relu(self.up(x)))


class _Shared(nn.Module):
    """One layer's weights in both blocks."""

    def __init__(self):
        super().__init__()
        self.emb, self.layer, self.head = nn.Embedding(VOCAB, D), _Layer(), nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.head(self.layer(self.layer(self.emb(ids))))


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = _Shared().eval()
    ids, other = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (3, 7))
    gm = trace(model, (ids,))
    gm = run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False)
    ctx = PassContext(example_inputs=(ids,), calibration=[(ids,), (other,)], progress=lambda it, **_: it)
    report = PipelineReport()
    out = run_pass(get_pass_class("prune")(method="flap", ratio=0.3), gm, ctx, report=report)  # verified
    return gm, out, report.records[-1], other


def test_heads_and_channels_are_removed(pruned):
    gm, out, record, _ = pruned
    assert record.sites == 2  # the shared layer's heads group and its channels group, once each
    q_rows = out.layer.q.weight.shape[0]
    assert q_rows < D and q_rows % (D // HEADS) == 0  # whole heads
    assert out.layer.q_norm.shape == (q_rows,) and out.layer.o.weight.shape == (D, q_rows)
    assert out.layer.up.weight.shape[0] < 64
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in gm.parameters())


def test_shared_bias_is_compensated_once(pruned):
    gm, out, record, _ = pruned
    # FLAP's compensation goes to the consumers' biases; the layer runs twice but owns one bias
    assert set(record.notes["compensated"]) == {"layer.o.weight", "layer.down.weight"}
    biases = [n.target for n in out.graph.nodes if n.op == "get_attr" and n.target.endswith(".bias")]
    assert sorted(set(biases)) == sorted({n.target for n in gm.graph.nodes
                                          if n.op == "get_attr" and n.target.endswith(".bias")})


def test_mean_over_all_heads_is_rescaled_in_each_block(pruned):
    _, out, record, _ = pruned
    assert record.notes["rescaled_means"] == 2  # the q_norm's mean, once per block
    scales = [u for n in out.graph.nodes if n.target == torch.ops.aten.mean.dim for u in n.users
              if u.target == torch.ops.aten.mul.Tensor and isinstance(u.args[1], float)]
    assert len(scales) == 2 and all(s.args[1] == pytest.approx(out.layer.q.weight.shape[0] / D) for s in scales)


def test_heads_folded_into_batch_size_follow_the_pruning(pruned):
    gm, out, _, other = pruned
    kept = out.layer.q.weight.shape[0] // (D // HEADS)
    # every view to (b * heads, s, d) now multiplies the batch by the kept head count
    factors = {n.args[1] for n in out.graph.nodes if n.target == operator.mul and isinstance(n.args[1], int)}
    assert kept in factors and HEADS not in factors
    assert out(other)[0].shape == (3, 7, VOCAB)  # another batch size runs


class _Sdpa(nn.Module):
    """GQA through F.scaled_dot_product_attention(enable_gqa=True): 4 query heads, 2 kv heads."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.k, self.v = nn.Linear(D, D // 2), nn.Linear(D, D // 2)

    def forward(self, x):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, -1, D // HEADS).transpose(1, 2)  # noqa: E731
        att = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True, enable_gqa=True)
        return self.o(att.transpose(1, 2).reshape(b, s, D))


@pytest.fixture(scope="module")
def sdpa():
    torch.manual_seed(0)
    model, x = _Sdpa().eval(), torch.randn(2, 5, D)
    gm = trace(model, (x,))
    return run_pass(get_pass_class("canonicalize")(), gm, PassContext(), verify=False), x


@pytest.mark.parametrize("structure, q_rows, k_rows", [("heads", 16, 8), ("query_heads", 16, 16)])
def test_sdpa_heads_are_coupled_across_q_k_v_o(sdpa, structure, q_rows, k_rows):
    """A kv head takes its group of query heads; a query head index goes in every group."""
    from fxforge.ir.depgraph import analyze

    gm, x = sdpa
    found = {g.kind: g for g in analyze(gm).groups if g.kind in ("heads", "query_heads")}
    assert found["heads"].units == 2 and found["query_heads"].units == 2
    assert all(g.prunable for g in found.values()), [g.describe() for g in found.values()]
    assert {m.name for m in found["heads"].members} >= {"q.weight", "k.weight", "v.weight", "o.weight"}
    report = PipelineReport()
    out = run_pass(get_pass_class("prune")(method="magnitude", ratio=0.5, structures=(structure,)), gm,
                   PassContext(example_inputs=(x,)), report=report)  # verified: == zeroed heads
    assert report.records[-1].sites == 1
    assert out.q.weight.shape[0] == q_rows and out.k.weight.shape[0] == k_rows
    assert out.v.weight.shape[0] == k_rows and out.o.weight.shape[1] == q_rows
    assert out(torch.randn(3, 7, D))[0].shape == (3, 7, D)


class _FusedSlices(nn.Module):
    """Phi-3's fused projections split by slices: qkv (4 query, 2 kv heads) and gate_up."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.gate_up, self.down = nn.Linear(D, 128), nn.Linear(64, D)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x)
        split = lambda t: t.view(b, s, -1, D // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(qkv[..., :D]), split(qkv[..., D:D + D // 2]), split(qkv[..., D + D // 2:])
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        att = torch.softmax(q @ k.transpose(2, 3) / 8 ** 0.5, -1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, s, D))
        gate_up = self.gate_up(x)
        return x + self.down(gate_up[..., 64:] * torch.nn.functional.silu(gate_up[..., :64]))


def test_fused_projections_split_by_slices_are_pruned():
    """Slices tiling a fused output are a concatenation: each head/channel owns rows in every
    part, and the slice bounds move with the kept widths."""
    torch.manual_seed(0)
    model, x = _FusedSlices().eval(), torch.randn(2, 5, D)
    gm = run_pass(get_pass_class("canonicalize")(), trace(model, (x,)), PassContext(), verify=False)
    report = PipelineReport()
    out = run_pass(get_pass_class("prune")(method="magnitude", ratio=0.4), gm,
                   PassContext(example_inputs=(x,)), report=report)  # verified: == zeroed units
    kinds = {label.split("(")[1].split(",")[0] for label in report.records[-1].notes["widths"]}
    assert kinds == {"heads", "channels"}, report.records[-1].notes["widths"]
    q_rows = out.o.weight.shape[1]
    assert q_rows < D and out.qkv.weight.shape[0] == 2 * q_rows  # k and v lose their share too
    hidden = out.down.weight.shape[1]
    assert hidden < 64 and out.gate_up.weight.shape[0] == 2 * hidden
    bounds = sorted((n.args[2], n.args[3]) for n in out.graph.nodes
                    if n.target == torch.ops.aten.slice.Tensor and n.args[2] is not None)
    assert (0, hidden) in bounds and (hidden, 2 * hidden) in bounds and (0, q_rows) in bounds
    assert out(torch.randn(3, 7, D))[0].shape == (3, 7, D)
