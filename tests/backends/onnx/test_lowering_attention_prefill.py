"""Prefill attention kernels: fxforge::attention -> com.microsoft::MultiHeadAttention (option
`bidirectional_attention`) and GroupQueryAttention (the default for causal self-attention),
run by ONNX Runtime (CPU) against the op's reference within FLOAT32_REORDERED."""
import pytest
import torch

from fxforge.backends.onnx.options import OnnxOptions
from fxforge.errors import BackendError
from fxforge.ir.verify import FLOAT32_REORDERED
from tests.backends.onnx.test_lowering_attention import (SEQ, Attend, ManyAttends, assert_matches, bool_mask, export,
                                                         operators, qkv, run)

MHA = OnnxOptions(bidirectional_attention="MultiHeadAttention")
ATOL = FLOAT32_REORDERED.max_abs  # the attention lowering's declared tolerance (outputs of magnitude ~1)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_multi_head_attention_masks(kind):
    # per batch, per head, 2-D, key padding (BERT), 1-D; each once without a mask too
    shapes = [(2, 1, 5, 5), (1, 4, 5, 5), (5, 5), (2, 1, 1, 5), (5,)]
    masks = [bool_mask(shape) for shape in shapes]
    if kind == "additive":
        masks = [torch.randn(m.shape).masked_fill(~m, float("-inf")) for m in masks]
    inputs = (*qkv(2, 4, 4, 5, 5), *masks)
    calls = [((0, 1, 2, 3 + i), False, None, 1) for i in range(len(masks))] + [((0, 1, 2, None), False, 0.3, 1)]
    module = ManyAttends(calls)
    model = export(module, inputs, options=MHA)
    assert operators(model).count("MultiHeadAttention") == len(calls) and "Attention" not in operators(model)
    assert_matches(module, inputs, model, atol=ATOL)


def test_multi_head_attention_padding_with_dynamic_length_and_cross_attention():
    # BERT's case: a (B, 1, 1, L) key padding mask, exported once, run at other lengths;
    # plus a cross-attention call (Lq != Lk).
    module = Attend(False, None, 1)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    model = export(module, (*qkv(2, 4, 4, 6, 6), padding), ({2: SEQ}, {2: SEQ}, {2: SEQ}, {3: SEQ}), options=MHA)
    assert "MultiHeadAttention" in operators(model)
    for length in (6, 13):
        padding = torch.ones(2, 1, 1, length, dtype=torch.bool)
        padding[1, ..., length - 3:] = False  # second sequence right-padded
        assert_matches(module, (*qkv(2, 4, 4, length, length), padding), model, atol=ATOL)
    cross = (*qkv(1, 4, 4, 3, 7)[:1], *qkv(1, 4, 4, 7, 7)[1:])
    assert_matches(module, (*cross, torch.ones(1, 1, 1, 7, dtype=torch.bool)),
                   export(module, (*cross, torch.ones(1, 1, 1, 7, dtype=torch.bool)), options=MHA), atol=ATOL)


def test_multi_head_attention_fully_masked_rows_are_zero():
    q, k, v = qkv(1, 2, 2, 5, 5)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    additive = torch.zeros(5, 5).masked_fill(~mask, float("-inf"))
    module = ManyAttends([((0, 1, 2, 3), False, None, 1), ((0, 1, 2, 4), False, None, 1)])
    inputs = (q, k, v, mask, additive)
    model = export(module, inputs, options=MHA)
    assert operators(model).count("MultiHeadAttention") == 2
    for out in run(model, inputs, all_outputs=True):
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))  # as the reference
    assert_matches(module, inputs, model, atol=ATOL)


def test_multi_head_attention_leaves_what_it_cannot_express_to_attention():
    # causal (GroupQueryAttention's or Attention's), GQA non-causal, float16
    q, k, v = qkv(1, 4, 2, 5, 5)
    halves = qkv(1, 4, 4, 5, 5, dtype=torch.float16)
    inputs = (q, k, v, bool_mask((5, 5)), *halves)
    module = ManyAttends([((0, 1, 2, 3), True, None, 2), ((0, 1, 2, 3), False, None, 2), ((4, 5, 6, None), False, None, 1)])
    model = export(module, inputs, options=MHA)
    assert "MultiHeadAttention" not in operators(model) and operators(model).count("Attention") == 3
    assert_matches(module, inputs, model, atol=2e-3)


def test_causal_prefill_defaults_to_group_query_attention():
    # Llama's prompt pass: causal, GQA 4/2, no mask; and the same with the other operator chosen.
    module = Attend(True, None, 2)
    inputs = qkv(2, 4, 2, 9, 9)
    model = export(module, inputs, ({2: SEQ}, {2: SEQ}, {2: SEQ}))
    assert "GroupQueryAttention" in operators(model) and "Attention" not in operators(model)
    for length in (9, 20):
        assert_matches(module, qkv(2, 4, 2, length, length), model, atol=ATOL)
    assert "GroupQueryAttention" not in operators(export(module, inputs, options=OnnxOptions(causal_attention="Attention")))


def test_unknown_bidirectional_operator_is_refused():
    with pytest.raises(BackendError, match="bidirectional_attention='Flash' must be one of Attention, MultiHeadAttention"):
        OnnxOptions(bidirectional_attention="Flash")
