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


def test_sliding_window_is_proved_with_its_width():
    # j <= i and j > i - 3: a band with a lower edge, which is not the causal triangle; fuse_attention
    # keeps it (only "causal" and "all" drop a mask) and add_kv_cache narrows its tree mask to it
    verdict, kind = _verdict(_sliding_window)
    assert kind == "sliding_window" and verdict.window == 3, verdict.reason
    assert verdict.reason == "the mask is a causal sliding window: key j visible from query i iff 0 <= i - j < 3"


def _band_buffer(window: int, n: int = 8) -> torch.Tensor:
    # GPT-Neo's local layers: tril(ones) ^ tril(ones, -window), materialized at init
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return causal ^ torch.tril(causal, -window)


def _additive_band_sum(self, scores):
    # GPT-Neo's two masks in additive form, summed: the buffer band plus the causal triangle
    j, i = _positions(scores)
    band = torch.zeros(1, 1, S, S).masked_fill(~self.table[:S, :S], float("-inf"))
    return band + torch.where(j <= i, 0.0, float("-inf"))[None, None]


@pytest.mark.parametrize("build", [_tril_buffer, _additive_band_sum])
def test_a_band_buffer_is_proved_a_sliding_window(build):
    verdict, kind = _verdict(build, buffer=_band_buffer(2))
    assert kind == "sliding_window" and verdict.window == 2, verdict.reason


def test_a_band_buffer_wider_than_the_slice_is_still_a_window_of_its_width():
    # a window of 7 in an 8-long buffer sliced to S=6: no key is hidden by the window here, but at
    # the buffer's full length one is, so the verdict keeps the width (add_kv_cache must not drop it)
    verdict, kind = _verdict(_tril_buffer, buffer=_band_buffer(7))
    assert kind == "sliding_window" and verdict.window == 7, verdict.reason


def test_a_band_that_does_not_reach_the_diagonal_is_not_a_window():
    def keys_two_back(self, scores):
        j, i = _positions(scores)
        return ((j <= i - 1) & (j > i - 3))[None, None]

    verdict, kind = _verdict(keys_two_back)
    assert kind is None and verdict.reason.startswith("the mask is a band -2 <= j - i <= -1"), verdict.reason


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


# --------------------------------------------------------------------------- transformers' masking_utils


def _cumsum_positions(self, scores):
    pos = torch.ones(S, dtype=torch.long).cumsum(0) - 1  # 0, 1, 2, ...
    return (pos[None, :] <= pos[:, None])[None, None]


def _packed_positions(self, scores):
    # two packed sequences (positions 0,1,2,0,1,2): the same-sequence check makes it block-diagonal
    pos = self.table[None]
    packed = torch.diff(pos, prepend=pos[:, :1] - 1).ne(1).cumsum(-1)[0]
    j, i = _positions(scores)
    return ((j <= i) & (packed[i] == packed[j]))[None, None]


def test_positions_from_a_cumsum_of_ones_are_proved_causal():
    verdict, kind = _verdict(_cumsum_positions)
    assert kind == "causal", verdict.reason


def test_packed_sequences_keep_their_block_mask():
    verdict, kind = _verdict(_packed_positions, buffer=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert kind is None and "cannot interpret" in verdict.reason


class HFMask(nn.Module):
    """transformers' own mask builder (masking_utils) for (2, S, 8) embeddings, eager attention."""

    def __init__(self, window=None):
        super().__init__()
        import transformers
        from transformers import masking_utils

        self.config = transformers.MistralConfig(hidden_size=8, num_attention_heads=2, sliding_window=window,
                                                 attn_implementation="eager")
        self.make = masking_utils.create_sliding_window_causal_mask if window else masking_utils.create_causal_mask

    def forward(self, embeds, attention_mask=None, position_ids=None):
        if position_ids is None:  # what LlamaModel does without position_ids: cache_position[None]
            position_ids = torch.arange(embeds.shape[1])[None]
        return self.make(self.config, embeds, attention_mask, None, position_ids)


def _hf_verdict(window=None, **inputs):
    gm = trace(HFMask(window).eval(), (torch.randn(2, S, 8),), inputs, dynamic_shapes=None)
    canonicalize(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return explain_mask(out[0] if isinstance(out, (tuple, list)) else out, gm, S, S)


def test_transformers_causal_mask_without_attention_mask_is_proved_causal():
    # positions gathered with index, the packed-sequence check (cumsum(diff(pos) != 1) equal), where(min)
    verdict = _hf_verdict()
    assert verdict.kind == "causal", verdict.reason


def test_transformers_mask_with_an_attention_mask_input_is_kept():
    verdict = _hf_verdict(attention_mask=torch.ones(2, S, dtype=torch.long))  # all ones when traced: still an input
    assert verdict.kind is None
    assert verdict.reason.startswith("the mask depends on the model input `attention_mask`")


def test_transformers_mask_with_position_ids_input_is_kept():
    # given position_ids may hold packed sequences, so the same-sequence check is not provably true
    verdict = _hf_verdict(position_ids=torch.arange(S)[None])
    assert verdict.kind is None
    assert verdict.reason.startswith("the mask depends on the model input `position_ids`")


def test_transformers_sliding_window_mask_is_proved_with_its_width():
    verdict = _hf_verdict(window=3)
    assert verdict.kind == "sliding_window" and verdict.window == 3, verdict.reason
