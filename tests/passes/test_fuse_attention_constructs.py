"""fuse_attention and add_kv_cache on attention constructs of the architecture sweep's families.

One hand-written LM (embedding -> 2-head attention -> LM head, no positions) spells its
attention the way a family does: GPT-Neo's buffer where-mask with a 0-d constant fill below the
additive mask, TrOCR's head-merged (B·H, L, L) softmax into bmm, XGLM's floor at the lowest
value and its view round trip, GPT-NeoX-Japanese's bmm scores (into zeros) with a 4-D P·V,
MPNet's in-place relative position bias, TrOCR's (B, L) position rows, XGLM's (1, L) one viewed with batch 1, DeBERTa's `+ 0`, MiMo's row maximum subtracted by hand,
and attention sinks (GPT-OSS's appended logit column; Granite-SWA's logsumexp scaling), which
the op cannot take: those stay eager with the accepted reason and are cached as they are.
Each is checked for structure (no softmax or P·V left), match count and numerics at two
lengths, and (decoders) cached decoding == the model.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from fxforge.errors import PassError
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import summarize
from fxforge.ir.trace import trace
from fxforge.passes.attention.fuse_attention import ACCEPTED_SKIP_REASONS, FuseAttention
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.meta_keys import KV_META

aten = torch.ops.aten
ATTENTION = torch.ops.fxforge.attention.default
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
LOWEST = torch.finfo(torch.float32).min
VOCAB, DIM, HEADS = 32, 16, 2


class ConstructLM(nn.Module):
    """A one-layer LM whose causal attention is written in one family's `spelling`."""

    def __init__(self, spelling: str, max_len: int = 16):
        super().__init__()
        self.spelling = spelling
        self.embed = nn.Embedding(VOCAB, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)
        self.register_buffer("tril", torch.ones(max_len, max_len, dtype=torch.bool).tril().view(1, 1, max_len, max_len))
        self.register_buffer("masked_bias", torch.tensor(-1e9))  # GPT-Neo's 0-d fill
        self.rel = nn.Parameter(torch.randn(1, HEADS, max_len, max_len) * 0.5)  # a learned position bias
        self.sink = nn.Parameter(torch.randn(HEADS))
        self.pos = nn.Embedding(max_len, DIM)  # TrOCR's learned positions, read at arange(L).expand(B, -1)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, _ = x.shape
        if self.spelling == "merged_bmm":
            x = x + self.pos(torch.arange(0, n, device=ids.device).expand(b, -1))
        if self.spelling == "merged_floor":  # XGLM: a (1, L) row looked up and viewed with batch 1
            rows = torch.arange(0, n, device=ids.device).unsqueeze(0) + 2
            x = x + self.pos.weight.index_select(0, rows.view(-1)).view(1, n, DIM)
        h, d, s = HEADS, DIM // HEADS, self.spelling
        q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        additive = torch.zeros(n, n, device=x.device).masked_fill(~visible, LOWEST)
        scale = 1 / math.sqrt(d)
        if s in ("merged_bmm", "merged_floor"):  # TrOCR, XGLM
            q3, k3, v3 = ((t * scale if t is q else t).reshape(b * h, n, d) for t in (q, k, v))
            scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, n, n) + additive
            if s == "merged_floor":
                scores = torch.max(scores, torch.tensor(LOWEST))
            probs = scores.view(b * h, n, n).softmax(-1)
            if s == "merged_floor":
                probs = probs.view(b, h, n, n).view(b * h, n, n)
            out = torch.bmm(probs, v3).view(b, h, n, d)
        elif s == "bmm_scores":  # GPT-NeoX-Japanese: baddbmm into zeros, P·V in 4-D
            q3, k3 = q.reshape(b * h, n, d), k.reshape(b * h, n, d)
            scores = torch.zeros(b * h, n, n, device=x.device) + torch.bmm(q3, k3.transpose(1, 2)) * scale
            out = (scores.view(b, h, n, n) + additive).softmax(-1) @ v
        elif s == "neo_where":  # GPT-Neo: no scale, buffer where-mask with a 0-d fill, then the mask
            scores = q @ k.transpose(-1, -2)
            scores = torch.where(self.tril[:, :, :n, :n], scores, self.masked_bias) + additive
            out = scores.softmax(-1) @ v
        else:
            scores = q @ k.transpose(-1, -2) * scale
            if s == "rel_bias_inplace":  # MPNet
                scores += self.rel[:, :, :n, :n]
            if s == "add_zero":  # DeBERTa without relative attention
                scores = scores + 0
            scores = scores + additive
            if s == "row_max":  # MiMo
                scores = scores - scores.max(-1, keepdim=True)[0]
            if s == "sink_cat":  # GPT-OSS
                sink = self.sink.reshape(1, -1, 1, 1).expand(b, -1, n, -1)
                scores = torch.cat([scores, sink], -1)
                scores = scores - scores.max(-1, keepdim=True)[0]
                out = scores.softmax(-1)[..., :-1] @ v
            else:
                out = scores.softmax(-1) @ v
            if s == "sink_lse":  # Granite-SWA
                lse = torch.logsumexp(scores, -1)
                out = out * torch.sigmoid(lse - self.sink.view(1, -1, 1)).unsqueeze(-1)
        return self.lm_head(x + out.transpose(1, 2).reshape(b, n, DIM))


FUSED = ["merged_bmm", "merged_floor", "bmm_scores", "neo_where", "rel_bias_inplace", "add_zero", "row_max"]
SINKS = ["sink_cat", "sink_lse"]


@functools.lru_cache(maxsize=None)
def _fused(spelling: str):
    torch.manual_seed(0)
    model = ConstructLM(spelling).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    gm = trace(model, (ids,))
    canonicalize(gm)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(ids,)), report=report)
    return model, ids, gm, fused, report.records[0]


def _ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("spelling", FUSED)
def test_construct_is_fused_exactly(spelling):
    model, ids, _gm, fused, record = _fused(spelling)
    assert record.sites == 1 and record.skipped == []
    ops = _ops(fused)
    assert sum(n.target == ATTENTION for n in ops) == 1
    assert not any(n.target in SOFTMAXES or n.target in (aten.bmm.default, aten.matmul.default) for n in ops)
    with torch.no_grad():
        for seq in (7, 11):
            x = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
            torch.testing.assert_close(fused(x)[0], model(x), atol=1e-5, rtol=1e-5)


def test_position_bias_goes_into_the_ops_bias_input():
    _model, _ids, _gm, fused, _record = _fused("rel_bias_inplace")
    (op,) = [n for n in _ops(fused) if n.target == ATTENTION]
    assert len(op.args) == 8 and op.args[7] is not None and op.args[3] is None and op.args[4] is True


@pytest.mark.parametrize("spelling", SINKS)
def test_attention_sinks_stay_eager_with_the_accepted_reason(spelling):
    _model, _ids, gm, fused, record = _fused(spelling)
    assert record.sites == 0 and len(record.skipped) == 1
    why = record.skipped[0][1]
    assert why.startswith(ACCEPTED_SKIP_REASONS) and why.startswith("attention sink")
    assert summarize(fused).ops == summarize(gm).ops  # never half-rewritten


@pytest.mark.parametrize("spelling,graph", [(s, "fused") for s in FUSED if s != "rel_bias_inplace"] + [
    (s, "eager") for s in SINKS + ["neo_where", "row_max", "add_zero"]])
def test_construct_is_cached_exactly(spelling, graph):
    """prefill 4 tokens, then one token at a time: the model's own logits, with the attention
    fused or as the model wrote it (the eager cache replaces both of GPT-Neo's masks)."""
    model, ids, gm, fused, _record = _fused(spelling)
    cached = run_pass(AddKvCache(), fused if graph == "fused" else gm, PassContext(example_inputs=(ids,)))
    meta = cached.meta[KV_META]
    assert len(meta.past) == 1
    past, steps = empty_past(meta, ids.shape[0], torch.float32), []
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 7)):
        out = cached(*cached_inputs(meta, ids[:, start:stop], start, past))
        steps.append(out[0])
        past = [out[i] for pair in meta.present for i in pair]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=1e-5)


def test_head_merged_eager_attention_asks_for_fuse_attention_first():
    _model, ids, gm, _fused_gm, _record = _fused("merged_bmm")
    with pytest.raises(PassError, match="head-merged .* run `fuse_attention` first"):
        run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)))
