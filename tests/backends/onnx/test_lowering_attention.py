"""fxforge::attention exported to ONNX and run by ONNX Runtime (CPU) against the reference."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxforge.ir.ops  # noqa: F401  (registers fxforge::attention)
from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table
from fxforge.backends.onnx.options import OnnxOptions
from fxforge.errors import BackendError

reference = torch.ops.fxforge.attention
GQA = OnnxOptions(causal_attention="GroupQueryAttention")


class Attend(torch.nn.Module):
    """q, k, v (and a mask) in, fused attention out: what the fuse_attention pass leaves behind."""

    def __init__(self, is_causal, scale, groups):
        super().__init__()
        self.is_causal, self.scale, self.groups = is_causal, scale, groups

    def forward(self, q, k, v, mask=None):
        return reference(q, k, v, mask, self.is_causal, self.scale, self.groups)


class ManyAttends(torch.nn.Module):
    """Several attention calls in one graph, so one (slow, ~3 s) export covers many cases.

    Each call is (q, k, v, mask) input indices (mask None for none) and is_causal, scale, groups.
    """

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, *inputs):
        return tuple(
            reference(inputs[qi], inputs[ki], inputs[vi], None if mi is None else inputs[mi], causal, scale, groups)
            for (qi, ki, vi, mi), causal, scale, groups in self.calls
        )


def export(module, inputs, dynamic_shapes=None, options=None):
    if isinstance(module, ManyAttends) and dynamic_shapes is not None:
        dynamic_shapes = (tuple(dynamic_shapes),)  # forward(*inputs): one spec for the varargs
    program = torch.onnx.export(
        module, inputs, dynamo=True, custom_translation_table=translation_table(options),
        opset_version=OPSET_VERSION, dynamic_shapes=dynamic_shapes, verbose=False,
    )
    return program.model_proto


def run(model_proto, inputs, all_outputs=False):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]
    return outputs if all_outputs else outputs[0]


def operators(model_proto):
    return [node.op_type for node in model_proto.graph.node]


def qkv(b, hq, hkv, lq, lk, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype),
            torch.randn(b, hkv, lk, d, dtype=dtype))


def assert_matches(module, inputs, model_proto, atol=1e-5):
    expected = module(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = run(model_proto, inputs, all_outputs=True)
    assert len(got) == len(expected)
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"output {index}"
        torch.testing.assert_close(g, e, atol=atol, rtol=atol, msg=lambda m: f"output {index}: {m}")



SEQ = torch.export.Dim("seq", min=2, max=128)


@pytest.mark.parametrize("groups", [1, 2])
def test_self_attention_dynamic_length(groups):
    calls = [((0, 1, 2, None), True, None, groups), ((0, 1, 2, None), False, 0.2, groups)]
    module = ManyAttends(calls)
    model = export(module, qkv(2, 4, 4 // groups, 6, 6), ({2: SEQ}, {2: SEQ}, {2: SEQ}))
    # Lq and Lk are the same symbol, so causal self-attention is exact with GroupQueryAttention
    # (the default) and no mask is built; the non-causal call is MultiHeadAttention's unless GQA.
    assert operators(model).count("GroupQueryAttention") == 1
    assert operators(model).count("MultiHeadAttention" if groups == 1 else "Attention") == 1
    assert "LessOrEqual" not in operators(model)
    if groups == 1:  # Attention chosen instead: its native top-left is_causal, no mask (checked below)
        model = export(module, qkv(2, 4, 4, 6, 6), ({2: SEQ}, {2: SEQ}, {2: SEQ}),
                       options=OnnxOptions(causal_attention="Attention", bidirectional_attention="Attention"))
        assert operators(model) == ["Attention", "Attention"]
    for length in (6, 11):  # the export length and another one
        assert_matches(module, qkv(2, 4, 4 // groups, length, length), model)


def test_rectangular_causal_is_bottom_right():
    # (Lq, Lk) = (3, 7): a chunk against a cache; (1, 9): one decode step; (7, 3): the first
    # four queries see nothing and must give 0.
    shapes = [(3, 7), (1, 9), (7, 3)]
    inputs = [t for lq, lk in shapes for t in qkv(1, 4, 2, lq, lk)]
    module = ManyAttends([((3 * i, 3 * i + 1, 3 * i + 2, None), True, 0.3, 2) for i in range(3)])
    model = export(module, tuple(inputs))
    assert_matches(module, inputs, model)
    assert torch.equal(run(model, inputs, all_outputs=True)[2][:, :, :4], torch.zeros(1, 4, 4, 16))


def test_rectangular_causal_with_dynamic_lengths():
    # Decoding a chunk against a cache: the two lengths are different symbols, so the
    # bottom-right triangle is built in the graph from the run-time shapes.
    cache = torch.export.Dim("cache", min=2, max=128)
    module = Attend(True, None, 2)
    model = export(module, qkv(1, 4, 2, 3, 8), ({2: SEQ}, {2: cache}, {2: cache}))
    assert "LessOrEqual" in operators(model)
    for lq, lk in [(3, 8), (5, 21), (4, 4)]:
        assert_matches(module, qkv(1, 4, 2, lq, lk), model)


MASK_SHAPES = [(2, 1, 5, 5), (1, 4, 5, 5), (5, 5), (2, 1, 1, 5), (5,)]  # per batch, per head, 2-D, padding, 1-D


def bool_mask(shape):
    mask = torch.rand(shape) > 0.4
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_with_and_without_causal(kind):
    masks = [bool_mask(shape) for shape in MASK_SHAPES]
    if kind == "additive":
        masks = [torch.randn(m.shape).masked_fill(~m, float("-inf")) for m in masks]
    inputs = (*qkv(2, 4, 2, 5, 5), *masks)
    calls = [((0, 1, 2, 3 + i), causal, None, 2) for i in range(len(masks)) for causal in (False, True)]
    module = ManyAttends(calls)
    assert_matches(module, inputs, export(module, inputs))


def test_mask_with_dynamic_length():
    module = Attend(True, None, 2)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    model = export(module, (*qkv(2, 4, 2, 6, 6), padding), ({2: SEQ}, {2: SEQ}, {2: SEQ}, {3: SEQ}))
    for length in (6, 13):
        padding = torch.ones(2, 1, 1, length, dtype=torch.bool)
        padding[1, ..., :3] = False  # second sequence left-padded
        assert_matches(module, (*qkv(2, 4, 2, length, length), padding), model)


def test_fully_masked_rows_and_fp16():
    q, k, v = qkv(1, 2, 2, 5, 5)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    halves = qkv(1, 4, 2, 9, 9, dtype=torch.float16)
    module = ManyAttends([((0, 1, 2, 3), False, None, 1), ((4, 5, 6, None), True, None, 2)])
    inputs = (q, k, v, mask, *halves)
    model = export(module, inputs)
    masked_out = run(model, inputs)
    assert torch.equal(masked_out[:, :, 2], torch.zeros_like(masked_out[:, :, 2]))  # as the reference
    assert_matches(module, inputs, model, atol=2e-3)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_group_query_attention_operator(dtype, atol):
    module = ManyAttends([((0, 1, 2, None), True, None, 2), ((0, 3, 4, None), True, 0.5, 1)])
    inputs = lambda length: (*qkv(2, 4, 2, length, length, dtype=dtype), *qkv(2, 4, 4, length, length, dtype=dtype)[1:])
    model = export(module, inputs(6), tuple({2: SEQ} for _ in range(5)), options=GQA)
    assert operators(model).count("GroupQueryAttention") == 2 and "Attention" not in operators(model)
    for length in (6, 17):
        assert_matches(module, inputs(length), model, atol=atol)


def test_group_query_attention_setting_leaves_other_cases_on_attention():
    # A mask, or Lq != Lk, is not expressible with GroupQueryAttention: Attention is used.
    q, k, v = qkv(1, 4, 2, 5, 5)
    inputs = (q, k, v, bool_mask((5, 5)), q[:, :, :3])
    module = ManyAttends([((0, 1, 2, 3), True, None, 2), ((4, 1, 2, None), True, None, 2)])
    model = export(module, inputs, options=GQA)
    assert "GroupQueryAttention" not in operators(model)
    assert operators(model).count("Attention") == 2
    assert_matches(module, inputs, model)


def test_unknown_operator_name_is_refused():
    with pytest.raises(BackendError, match="causal_attention='FlashAttention' must be one of Attention, GroupQueryAttention"):
        OnnxOptions(causal_attention="FlashAttention")
