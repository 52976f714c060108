"""fxforge::attention -> the ONNX `Attention` operator (opset 23), or com.microsoft::GroupQueryAttention.

Default: standard `Attention` on the op's 4-D (B, H, L, D) tensors; GQA follows from the head
counts of q and k, the mask (bool or additive) is passed through, `scale` is always given
explicitly. Its `is_causal` is the top-left triangle, which equals the op's bottom-right
convention only when Lq == Lk. So is_causal=1 is used only when the two lengths are provably
equal at export time (the same static size or the same symbolic dim); otherwise the
bottom-right triangle is built in the graph (Range, LessOrEqual) and folded into the mask.
Same when a user mask comes with is_causal, so one mask carries both. An additive position
bias (ALiBi) is ONNX Attention's additive `attn_mask`: it is folded into the mask (added to an
additive one, Where-selected by a bool one) before the causal triangle is applied.

Alternative for causal self-attention without a mask (the prompt pass of a decoder), where it
was the fastest on CPU at long sequences: com.microsoft::GroupQueryAttention, on (B, L, H·D)
tensors, always causal. It is chosen by the backend option `causal_attention` (`OnnxOptions`):

    fxforge.compile(model, args, backend="onnx", backend_options={"causal_attention": "GroupQueryAttention"})
    export_onnx(gm, inputs, path, options=OnnxOptions(causal_attention="GroupQueryAttention"))

Cases it cannot express (a mask, Lq != Lk, Dv != D, dtypes other than fp32/fp16) still go to
`Attention`, so the setting never changes results, only speed.
"""
from __future__ import annotations

import math

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, FLOAT16, INT32
from onnxscript.values import Op

from fxforge.backends.onnx.lowerings import msft
from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.lowerings.attention_prefill import bidirectional_prefill
from fxforge.backends.onnx.options import OnnxOptions
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED


@register_lowering("onnx", "attention", tolerance=FLOAT32_REORDERED)
def attention_onnx(q, k, v, attn_mask, is_causal: bool, scale: float | None, num_kv_groups: int, bias=None, *,
                   options: OnnxOptions):
    head_dim = q.shape[3]
    if scale is None and not isinstance(head_dim, int):
        raise ValueError(
            "fxforge::attention -> ONNX: the head dim of q must be static to compute the default scale "
            "1/sqrt(head_dim); export with a fixed head dim or pass scale explicitly."
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    folded = bias is not None  # then the mask is additive, and already (.., Lq, Lk)
    if folded:
        attn_mask = _fold_bias(None if attn_mask is None else _expand_to_lengths(q, k, attn_mask),
                               _expand_to_lengths(q, k, bias), mask_is_bool=_is_bool(attn_mask))
    square = _same_dim(q.shape[2], k.shape[2])
    encoder = bidirectional_prefill(q, k, v, attn_mask, is_causal, scale, not folded and _is_bool(attn_mask),
                                    _expand_to_lengths, options=options)  # attention_prefill.py
    if encoder is not None:
        return encoder
    if (is_causal and attn_mask is None and square and options.causal_attention == "GroupQueryAttention"
            and _group_query_attention_applies(q, k, v)):
        return _group_query_attention(q, k, v, scale)
    native_causal = is_causal and square and attn_mask is None
    if is_causal and not native_causal:
        attn_mask = _with_causal_triangle(q, k, attn_mask, additive=folded)
    elif attn_mask is not None and not folded:
        attn_mask = _expand_to_lengths(q, k, attn_mask)
    if attn_mask is None:
        return _ATTENTION(q, k, v, is_causal=int(native_causal), scale=scale)
    return _ATTENTION(q, k, v, attn_mask, is_causal=0, scale=scale)


def _is_bool(value) -> bool:
    return value is not None and value.dtype == BOOL.dtype


def _same_dim(a, b) -> bool:
    # Static ints compare by value; symbolic dims (onnx_ir SymbolicDim) by their name.
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and a.value == getattr(b, "value", None)


def _fold_bias(attn_mask, bias, mask_is_bool: bool):
    """The mask with the additive bias applied: Attention-23's additive attn_mask is where a bias goes.

    (Expand's output may carry no dtype, so the caller says whether the mask was bool.)
    """
    if attn_mask is None:
        return bias
    if mask_is_bool:
        return op.Where(attn_mask, bias, op.CastLike(op.Constant(value_float=float("-inf")), bias))
    return op.Add(attn_mask, bias)


def _expand_to_lengths(q, k, attn_mask):
    """Broadcast the mask's last two dims to (Lq, Lk) when they are not already those.

    ORT 1.32's CPU Attention refuses a mask whose query dim is 1 (a (B, 1, 1, Lk) padding
    mask: "inconsistent q_sequence_length (between attn_mask and Q)") although the ONNX spec
    allows any broadcastable shape, so the mask is expanded first.
    """
    if attn_mask.shape is None:
        # No shape inferred: our own Add of a mask and a bias that were both expanded here first
        # (`_fold_bias` when there is a bias), so already (.., Lq, Lk); exporter values carry shapes.
        return attn_mask
    rank = len(attn_mask.shape)
    if rank >= 2 and _same_dim(attn_mask.shape[-2], q.shape[2]) and _same_dim(attn_mask.shape[-1], k.shape[2]):
        return attn_mask
    leading = op.Constant(value_ints=[1] * max(rank - 2, 0))
    target = op.Concat(leading, op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0)
    return op.Expand(attn_mask, target)


def _with_causal_triangle(q, k, attn_mask, additive: bool = False):
    """attn_mask AND (key j <= query i + Lk - Lq), computed from the run-time lengths.

    `additive`: the mask is known to be additive (a folded bias, whose Add may carry no dtype).
    """
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Unsqueeze(op.Range(zero, op.Squeeze(lq), one), op.Constant(value_ints=[1]))  # (Lq, 1)
    cols = op.Range(zero, op.Squeeze(lk), one)  # (Lk,)
    visible = op.LessOrEqual(cols, op.Add(rows, op.Sub(lk, lq)))  # (Lq, Lk) bool
    if attn_mask is None:
        return visible
    if not additive and attn_mask.dtype == BOOL.dtype:
        return op.And(attn_mask, visible)
    minus_inf = op.CastLike(op.Constant(value_float=float("-inf")), attn_mask)
    return op.Where(visible, attn_mask, minus_inf)


def _group_query_attention_applies(q, k, v) -> bool:
    return (
        q.dtype in (FLOAT.dtype, FLOAT16.dtype)
        and isinstance(q.shape[1], int)
        and isinstance(k.shape[1], int)
        and isinstance(q.shape[3], int)
        and _same_dim(q.shape[3], v.shape[3])
    )


def _group_query_attention(q, k, v, scale: float):
    """Causal (B, H, L, D) attention through com.microsoft::GroupQueryAttention's (B, L, H·D) layout."""
    q_heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    to_sequence_major = [0, 2, 1, 3]
    merge_heads = op.Constant(value_ints=[0, 0, -1])
    query = op.Reshape(op.Transpose(q, perm=to_sequence_major), merge_heads)
    key = op.Reshape(op.Transpose(k, perm=to_sequence_major), merge_heads)
    value = op.Reshape(op.Transpose(v, perm=to_sequence_major), merge_heads)
    # No past: every sequence is full length, so seqlens_k = L - 1 for each batch row.
    batch = op.Shape(q, start=0, end=1)
    length = op.Shape(q, start=2, end=3)  # int64 (1,)
    seqlens_k = op.Cast(op.Expand(op.Sub(length, op.Constant(value_ints=[1])), batch), to=INT32.dtype)
    total_length = op.Cast(op.Squeeze(length), to=INT32.dtype)
    out = _GROUP_QUERY_ATTENTION(
        query, key, value, None, None, seqlens_k, total_length,
        num_heads=q_heads, kv_num_heads=kv_heads, scale=scale,
    )
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, q_heads, head_dim]))
    return op.Transpose(out, perm=to_sequence_major)


def _attention_schema() -> OpSchema:
    """ONNX Attention-23 with its single used output, so the exporter sees one result."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "Attention",
        "",
        23,
        inputs=[param("Q", "T1"), param("K", "T1"), param("V", "T2"), param("attn_mask", "U", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k and the output"),
            ("T2", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "v"),
            ("U", ["tensor(bool)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "mask"),
        ],
        attributes=[
            attr("is_causal", OpSchema.AttrType.INT, "top-left causal triangle"),
            attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
        ],
    )


def _group_query_attention_schema() -> OpSchema:
    """The part of com.microsoft::GroupQueryAttention used here (no past, no rotary)."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            param("query", "T"), param("key", "T"), param("value", "T"),
            param("past_key", "T", param_option=optional), param("past_value", "T", param_option=optional),
            param("seqlens_k", "M"), param("total_sequence_length", "M"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "activations"),
            ("M", ["tensor(int32)"], "lengths"),
        ],
        attributes=[
            attr("num_heads", OpSchema.AttrType.INT, "query heads"),
            attr("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
            attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
        ],
    )


_ATTENTION = Op(op, "Attention", _attention_schema())
_GROUP_QUERY_ATTENTION = Op(msft, "GroupQueryAttention", _group_query_attention_schema())
