"""Bidirectional (non-causal) fxforge::attention -> com.microsoft::MultiHeadAttention.

The default for the encoder case (BERT, ViT: no causal triangle, one key/value head per query
head, float32), set by the backend option `bidirectional_attention` (`OnnxOptions`); ONNX
`Attention` instead:

    fxforge.compile(model, args, backend="onnx", backend_options={"bidirectional_attention": "Attention"})

Measured (bench/attention.py, BERT-base shapes, attention alone between the projections, fused
time / unfused time, 1 and 2 threads, 2-core VM under heavy load from other jobs): no mask,
0.65-0.81 (ONNX Attention 0.85-1.05); padding mask, 0.88-0.91 at 2048 tokens (Attention
0.94-0.99) and 0.80-1.30 at 512 (Attention 0.84-1.14: noise decides).

Why a second operator: ORT's CPU kernel for ONNX `Attention` (opset 23) computes all heads'
L×L scores as separate graph-sized steps; the contrib `MultiHeadAttention` kernel works one
(batch, head) at a time (scores of one head, mask added, softmax, times V), and without a mask
runs MLAS's tiled flash-attention kernel (`MlasFlashAttention`, which never holds the L×L
scores). Causal prompts go to `GroupQueryAttention` instead (attention.py: `causal_attention`),
whose kernel also skips the hidden triangle.

Mapping, exact up to float reordering (FLOAT32_REORDERED):
- q, k, v (B, H, L, D) -> (B, L, H·D), MultiHeadAttention's packed layout; the output back.
- The mask becomes MultiHeadAttention's additive `attention_bias` (B|1, H|1, Lq, Lk): a bool
  mask as 0 / lowest float32, an additive one clamped below at the lowest float32. Not -inf:
  ORT's softmax turns a row of -inf into NaN, while the lowest float keeps every masked
  probability exactly 0 next to any visible key (exp underflows) and a fully masked row finite.
- A fully masked query row: the reference yields zeros (as torch SDPA does); the kernel yields
  the mean of V over the (all lowest) row, so the output is multiplied by "this row sees a key"
  (0/1 from one reduction over the mask, which costs one read of the mask).
Cases it cannot express return None and stay with `Attention`: causal, GQA (MultiHeadAttention
has one key head per query head), Dv != D, non-float32 dtypes, non-static head counts.
"""
from __future__ import annotations

import numpy as np
from onnx.defs import OpSchema
from onnxscript import FLOAT
from onnxscript.values import Op

from fxforge.backends.onnx.lowerings import msft
from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.options import OnnxOptions

LOWEST = float(np.finfo(np.float32).min)


def bidirectional_prefill(q, k, v, attn_mask, is_causal: bool, scale: float, mask_is_bool: bool,
                          expand_to_lengths, *, options: OnnxOptions):
    """MultiHeadAttention for this call when the option asks for it and it applies, else None.

    `attn_mask` is None or broadcastable to (B, H, Lq, Lk) (a bias already folded in);
    `expand_to_lengths(q, k, mask)` broadcasts its last two dims to (Lq, Lk)."""
    if options.bidirectional_attention != "MultiHeadAttention" or is_causal or not _applies(q, k, v):
        return None
    if attn_mask is not None and attn_mask.shape is None:  # a mask folded with a bias: rank unknown here
        return None
    heads, head_dim = q.shape[1], q.shape[3]
    query, key, value = (_to_packed(t) for t in (q, k, v))
    if attn_mask is None:
        out = _MULTI_HEAD_ATTENTION(query, key, value, num_heads=heads, scale=scale)
        return _to_heads(out, heads, head_dim)
    if _is_key_padding(attn_mask):
        return _key_weighted(q, k, v, _rank4(attn_mask, len(attn_mask.shape)), mask_is_bool, heads, head_dim, scale)
    mask = _rank4(expand_to_lengths(q, k, attn_mask), max(len(attn_mask.shape), 2))  # expanding gives rank >= 2
    lowest = op.Constant(value_float=LOWEST)
    if mask_is_bool:
        bias = op.Where(mask, op.Constant(value_float=0.0), lowest)
        sees_a_key = op.ReduceMax(op.Cast(mask, to=FLOAT.dtype), op.Constant(value_ints=[-1]), keepdims=1)
    else:
        bias = op.Max(mask, lowest)
        row_max = op.ReduceMax(mask, op.Constant(value_ints=[-1]), keepdims=1)
        sees_a_key = op.Cast(op.Greater(row_max, op.Constant(value_float=float("-inf"))), to=FLOAT.dtype)
    out = _MULTI_HEAD_ATTENTION(query, key, value, None, None, bias, num_heads=heads, scale=scale)
    return op.Mul(_to_heads(out, heads, head_dim), sees_a_key)


def _is_key_padding(mask) -> bool:
    """The proof that a mask depends on (batch, key) alone: its static shape, (B|1, 1, 1, Lk) or a
    lower rank with 1s there; BERT's extended padding mask and a (Lk,) mask are such."""
    dims = list(mask.shape)
    return len(dims) <= 4 and all(d == 1 for d in dims[-3:-1]) and (len(dims) < 2 or dims[-2] == 1)


def _key_weighted(q, k, v, mask4, mask_is_bool: bool, heads: int, head_dim: int, scale: float):
    """Key-padding attention on MultiHeadAttention's flash path: the mask becomes key weights in V.

    A mask m[b, j] on keys alone multiplies key j's softmax weight by w_j = exp(m_j) (bool:
    0/1), so softmax(s + m)·V = Σ_j e^{s_j} w_j v_j / Σ_j e^{s_j} w_j. Appending w_j to each
    value row (V' = [w·v, w], Dv = D + 1) and dividing the output's first D columns by its last
    computes exactly that with no mask input, so ORT runs MlasFlashAttention (the L×L scores are
    never held). An additive mask enters ORT's kernels as a bias of the lowest float, whose
    exp clamps to a denormal in MLAS and slows every product it meets: weights avoid that (2048
    tokens, BERT-base, 1 thread: 0.65x the time of the attention_bias path, bench/attention.py).
    Additive w_j = exp(m_j - max_j m_j) (the shift cancels in the ratio); where every key of a
    sequence is below -1e30 the reference's float sum absorbs the scores (s + m = m), so q is
    zeroed there to do the same (the uniform average); an all -inf row gives zeros, as the
    reference does. Limit: visible keys' weights underflow if a padded key's score exceeds every
    visible key's by ~87 (exp's range), and that row comes out 0."""
    lowest = op.Constant(value_float=LOWEST)
    keys_axis = op.Constant(value_ints=[2])
    column = op.Transpose(mask4, perm=[0, 1, 3, 2])  # (B|1, 1, Lk, 1): one weight per key
    if mask_is_bool:
        weight = op.Cast(column, to=FLOAT.dtype)
        gate = None
    else:
        clamped = op.Max(column, lowest)
        top = op.ReduceMax(clamped, keys_axis, keepdims=1)  # (B|1, 1, 1, 1)
        weight = op.Exp(op.Sub(clamped, top))
        q = op.Mul(q, op.Cast(op.Greater(top, op.Constant(value_float=-1e30)), to=FLOAT.dtype))
        gate = op.Cast(op.Greater(op.ReduceMax(column, keys_axis, keepdims=1), op.Constant(value_float=float("-inf"))),
                       to=FLOAT.dtype)
    ones_shape = op.Concat(op.Shape(v, start=0, end=3), op.Constant(value_ints=[1]), axis=0)
    weighted = op.Concat(op.Mul(v, weight), op.Expand(weight, ones_shape), axis=3)  # (B, H, Lk, D + 1)
    out = _MULTI_HEAD_ATTENTION(_to_packed(q), _to_packed(k), _to_packed(weighted), num_heads=heads, scale=scale)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim + 1]))
    last = op.Constant(value_ints=[3])
    numerator = op.Slice(out, op.Constant(value_ints=[0]), op.Constant(value_ints=[head_dim]), last)
    denominator = op.Slice(out, op.Constant(value_ints=[head_dim]), op.Constant(value_ints=[head_dim + 1]), last)
    # A sequence with no visible key has 0 / 0: the floor makes it 0, as the reference's zeros.
    tiny = op.Constant(value_float=float(np.finfo(np.float32).tiny))
    result = op.Transpose(op.Div(numerator, op.Max(denominator, tiny)), perm=[0, 2, 1, 3])
    return result if gate is None else op.Mul(result, gate)


def _applies(q, k, v) -> bool:
    static = all(isinstance(d, int) for d in (q.shape[1], k.shape[1], q.shape[3], v.shape[3]))
    return (static and q.dtype == FLOAT.dtype and q.shape[1] == k.shape[1] and q.shape[3] == v.shape[3])


def _to_packed(t):
    """(B, H, L, D) -> (B, L, H·D)."""
    return op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def _to_heads(out, heads: int, head_dim: int):
    """(B, L, H·D) -> (B, H, L, D)."""
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


def _rank4(mask, rank: int):
    """A mask of rank <= 4 with leading 1s added: attention_bias is (B|1, H|1, Lq, Lk)."""
    if rank >= 4:
        return mask
    return op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - rank))))


def _multi_head_attention_schema() -> OpSchema:
    """The part of com.microsoft::MultiHeadAttention used here (no packed bias, no past)."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[
            param("query", "T"), param("key", "T"), param("value", "T"),
            param("bias", "T", param_option=optional), param("key_padding_mask", "M", param_option=optional),
            param("attention_bias", "T", param_option=optional),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"), ("M", ["tensor(int32)"], "key padding")],
        attributes=[
            attr("num_heads", OpSchema.AttrType.INT, "query heads"),
            attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
        ],
    )


_MULTI_HEAD_ATTENTION = Op(msft, "MultiHeadAttention", _multi_head_attention_schema())
