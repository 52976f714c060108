"""Prefill attention kernels: fxforge::attention -> com.microsoft::MultiHeadAttention (option
`bidirectional_attention`) and GroupQueryAttention (the default for causal self-attention),
run by ONNX Runtime (CPU) against the op's reference within FLOAT32_REORDERED.

Each export costs seconds, so one ManyAttends graph carries many cases."""
import pytest
import torch

from fxforge.backends.onnx.options import OnnxOptions
from fxforge.errors import BackendError
from fxforge.ir.verify import FLOAT32_REORDERED
from tests.backends.onnx.test_lowering_attention import (SEQ, Attend, ManyAttends, assert_matches, bool_mask, export,
                                                         operators, qkv, run)

MHA = OnnxOptions(bidirectional_attention="MultiHeadAttention")
ATOL = FLOAT32_REORDERED.max_abs  # the attention lowering's declared tolerance (outputs of magnitude ~1)


def test_multi_head_attention_masks_cross_attention_and_fully_masked_rows():
    # bool and additive masks per batch, per head, 2-D, key padding (BERT), 1-D; no mask; a
    # cross-attention call (Lq != Lk); query row 2 fully masked, bool and additive (-inf).
    shapes = [(2, 1, 5, 5), (1, 4, 5, 5), (5, 5), (2, 1, 1, 5), (5,)]
    bools = [bool_mask(shape) for shape in shapes]
    additive = [torch.randn(m.shape).masked_fill(~m, float("-inf")) for m in bools]
    hidden_row = torch.ones(5, 5, dtype=torch.bool)
    hidden_row[2] = False
    masks = [*bools, *additive, hidden_row, torch.zeros(5, 5).masked_fill(~hidden_row, float("-inf"))]
    q, k, v = qkv(2, 4, 4, 5, 5)
    inputs = (q, k, v, q[:, :, :3], *masks)
    calls = [((0, 1, 2, 4 + i), False, None, 1) for i in range(len(masks))]
    calls += [((0, 1, 2, None), False, 0.3, 1), ((3, 1, 2, 4 + 3), False, None, 1)]  # no mask; cross + padding
    module = ManyAttends(calls)
    model = export(module, inputs, options=MHA)
    assert operators(model).count("MultiHeadAttention") == len(calls) and "Attention" not in operators(model)
    assert_matches(module, inputs, model, atol=ATOL)
    for out in run(model, inputs, all_outputs=True)[len(masks) - 2:len(masks)]:
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))  # as the reference


def test_multi_head_attention_key_padding_with_dynamic_length():
    # BERT's case: a (B, 1, 1, L) key padding mask, exported once, run at other lengths.
    module = Attend(False, None, 1)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    model = export(module, (*qkv(2, 4, 4, 6, 6), padding), ({2: SEQ}, {2: SEQ}, {2: SEQ}, {3: SEQ}), options=MHA)
    assert "MultiHeadAttention" in operators(model)
    for length in (6, 13):
        padding = torch.ones(2, 1, 1, length, dtype=torch.bool)
        padding[1, ..., length - 3:] = False  # second sequence right-padded
        assert_matches(module, (*qkv(2, 4, 4, length, length), padding), model, atol=ATOL)


def test_multi_head_attention_leaves_what_it_cannot_express_to_attention():
    # causal with a mask, GQA non-causal, float16
    q, k, v = qkv(1, 4, 2, 5, 5)
    halves = qkv(1, 4, 4, 5, 5, dtype=torch.float16)
    inputs = (q, k, v, bool_mask((5, 5)), *halves)
    module = ManyAttends([((0, 1, 2, 3), True, None, 2), ((0, 1, 2, 3), False, None, 2), ((4, 5, 6, None), False, None, 1)])
    model = export(module, inputs, options=MHA)
    assert "MultiHeadAttention" not in operators(model) and operators(model).count("Attention") == 3
    assert_matches(module, inputs, model, atol=2e-3)


def test_causal_prefill_defaults_to_group_query_attention():
    # Llama's prompt pass: causal, GQA 4/2, no mask, dynamic length.
    module = Attend(True, None, 2)
    model = export(module, qkv(2, 4, 2, 9, 9), ({2: SEQ}, {2: SEQ}, {2: SEQ}))
    assert "GroupQueryAttention" in operators(model) and "Attention" not in operators(model)
    for length in (9, 20):
        assert_matches(module, qkv(2, 4, 2, length, length), model, atol=ATOL)


def test_unknown_bidirectional_operator_is_refused():
    with pytest.raises(BackendError, match="bidirectional_attention='Flash' must be one of Attention, MultiHeadAttention"):
        OnnxOptions(bidirectional_attention="Flash")


def test_key_padding_runs_without_a_mask_input_and_fully_padded_sequences_match():
    # A (B, 1, 1, Lk) mask is proven key-only by its shape: it becomes key weights in V, and
    # MultiHeadAttention gets no mask (ORT's flash path). Sequence 1 is fully padded: bool and
    # -inf give zeros, HF's lowest-float padding the reference's uniform average; a general
    # additive key bias (finite values) is reweighted exactly.
    lowest = torch.finfo(torch.float32).min
    keep = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., 5:] = False
    keep[1] = False
    hf = torch.zeros(keep.shape).masked_fill(~keep, lowest)
    minus_inf = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    bias = torch.randn(3, 1, 1, 7) * 3
    q, k, v = qkv(3, 4, 4, 6, 7)
    inputs = (q, k, v, keep, hf, minus_inf, bias)
    module = ManyAttends([((0, 1, 2, 3 + i), False, None, 1) for i in range(4)])
    model = export(module, inputs, options=MHA)
    heads = [node for node in model.graph.node if node.op_type == "MultiHeadAttention"]
    assert len(heads) == 4 and all(len(node.input) == 3 for node in heads)  # q, k, v: no bias, no padding mask
    assert_matches(module, inputs, model, atol=ATOL)
