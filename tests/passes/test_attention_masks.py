"""The attention mask analyser on its own: which masks it proves causal or all-visible, and why
it keeps the others (fuse_attention drops a mask only on such a proof)."""
import pytest
import torch
from torch import nn

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import trace
from fxforge.passes.attention.masks import classify_mask, explain_mask

S = 6  # query and key length


class MaskOf(nn.Module):
    """Returns the mask `build(scores, *extra)` makes for (1, 2, S, S) scores."""

    def __init__(self, build, buffer=None):
        super().__init__()
        self.build = build
        if buffer is not None:
            self.register_buffer("table", buffer)

    def forward(self, scores, attention_mask=None):
        return self.build(self, scores) if attention_mask is None else self.build(self, scores, attention_mask)


def _verdict(build, *extra, buffer=None, lq=S, lk=S):
    scores = torch.randn(1, 2, S, S)
    gm = trace(MaskOf(build, buffer).eval(), (scores, *extra), {}, dynamic_shapes=None)
    canonicalize(gm)
    (mask,) = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return explain_mask(mask, gm, lq, lk), classify_mask(mask, gm, lq, lk)


def _positions(scores):
    pos = torch.arange(scores.shape[-1])
    return pos[None, :], pos[:, None]  # key j (columns), query i (rows)


def _arange_causal(self, scores):
    j, i = _positions(scores)
    return (j <= i)[None, None]


def _tril_buffer(self, scores):
    return self.table[:S, :S]


def _additive_triu(self, scores):
    return torch.triu(torch.full((S, S), float("-inf")), diagonal=1)[None, None]


def _where_additive(self, scores):
    j, i = _positions(scores)
    return torch.where(j > i, float("-inf"), 0.0)[None, None]


def _padding(self, scores, attention_mask):
    return attention_mask[:, None, None, :].bool()


def _sliding_window(self, scores):
    j, i = _positions(scores)
    return ((j <= i) & (j > i - 3))[None, None]


def _one_ahead(self, scores):
    return torch.tril(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]


def _hidden_map(self, scores):
    j, i = _positions(scores)
    return (j > i)[None, None]


def _all_visible(self, scores):
    return torch.zeros(1, 1, S, S)


@pytest.mark.parametrize("build,buffer", [
    (_arange_causal, None),
    (_tril_buffer, torch.tril(torch.ones(8, 8, dtype=torch.bool))),
    (_additive_triu, None),
    (_where_additive, None),
])
def test_causal_spellings_are_proved(build, buffer):
    verdict, kind = _verdict(build, buffer=buffer)
    assert kind == "causal" and verdict.kind == "causal", verdict.reason


def test_causal_needs_the_query_and_key_lengths():
    verdict, kind = _verdict(_arange_causal, lq=S, lk=S + 2)  # decoding against a longer cache
    assert kind is None
    assert "not the query and key lengths" in verdict.reason


def test_an_all_zero_additive_mask_hides_nothing():
    verdict, kind = _verdict(_all_visible)
    assert kind == "all", verdict.reason


def test_padding_mask_from_an_input_is_kept_naming_the_input():
    verdict, kind = _verdict(_padding, torch.ones(1, S, dtype=torch.long))
    assert kind is None
    assert verdict.reason.startswith("the mask depends on the model input `attention_mask`")


def test_sliding_window_is_kept():
    # j <= i and j > i - 3: a band with a lower edge, which is not the causal triangle
    verdict, kind = _verdict(_sliding_window)
    assert kind is None and "cannot interpret" in verdict.reason


def test_a_triangle_one_key_ahead_is_refused_with_its_band():
    verdict, kind = _verdict(_one_ahead)
    assert kind is None
    assert verdict.reason == "the mask is a band j - i <= 1, not the causal triangle (j - i <= 0)"


def test_a_map_of_hidden_keys_is_not_taken_for_visible_ones():
    verdict, kind = _verdict(_hidden_map)
    assert kind is None and "True = hidden" in verdict.reason


def test_additive_position_bias_is_kept():
    bias = torch.randn(1, 1, S, S)  # ALiBi-like: a learned or computed bias, no triangle
    verdict, kind = _verdict(lambda self, scores: self.table, buffer=bias)
    assert kind is None and "cannot interpret" in verdict.reason
