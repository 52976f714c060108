"""Pass `fuse_attention`: every spelling of softmax(Q·Kᵀ·scale + mask)·V -> fxforge::attention.

    softmax(((Q·c1) @ (K·c2)ᵀ)·c3 + M) @ V           -> attention(Q, K, V, M, False, c1·c2·c3, 1)
    softmax(where(b, S, -inf)) @ V                      -> attention(..., mask=b, ...)
    ... @ repeat_kv(K, g), ... @ repeat_kv(V, g)        -> attention(Q, K, V, ..., num_kv_groups=g)
    aten.scaled_dot_product_attention(q, k, v, m, ...)  -> attention(q, k, v, m, ...)
    softmax((S + B)·c + M) @ V, B a position bias        -> attention(..., bias=B·c)   (ALiBi, MPNet's S += B)
    bmm over (B·H, L, D) viewed to 4-D around softmax   -> attention on unflattened q, k, v
    softmax(view3(S4 + M)) bmm V3, S4 = view4(bmm(Q3, K3ᵀ)) -> the same (TrOCR, XGLM; H read off the views)
    softmax(where(b, S, c) + M) @ V                      -> attention(..., mask=M and b)   (GPT-Neo)
    S + 0, max(S, lowest), S - rowmax(S)                 -> S  (the softmax cannot see them)

Anchored at each softmax: walk up through the mask and the scale factors to the score matmul
Q·Kᵀ, and down (through same-dtype casts; eval dropout is already gone) to the value matmul.
The recognizers are the `ir.match` Rule tables of `rules.py`, read (never rewritten) piece by
piece: a whole pattern cannot say "any number of scales, their factors multiplied" or "the
mask on either side of the add", so this walk strings the pieces together and rewrites once.
The SDPA spelling, one op, is one Rule (`SDPA_RULE`). The model's own mask computation
is kept and feeds the op's `attn_mask`; `is_causal=True` is set only where `masks.py`
proves a mask purely causal (then the mask is dropped). A softmax feeding a matmul that cannot
be proven equivalent (a tanh softcap, probabilities reused elsewhere, training dropout, ...) is
left untouched and listed in `PassResult.skipped` with the reason: nothing is rewritten until
the whole subgraph has matched. Exact: the default tolerance.

The reasons a softmax that weights values is left unfused, each naming the node. Two are
*accepted* (`ACCEPTED_SKIP_REASONS`: the construct, not a gap in the matcher; the layer stays
eager and add_kv_cache caches it with the model's own ops):
- "tanh soft-cap on the attention scores" (Gemma-2, Grok): the op has no soft-cap input;
- "attention sink" (GPT-OSS, MiMo, DeepSeek-V4, Flint: a learned logit concatenated to the
  scores and sliced off the probabilities; Granite-SWA: out·sigmoid(logsumexp(S) - sink)): the
  op has no sink input and returns no logsumexp.
The others are gaps, each a failure of the architecture sweep:
- the softmax is not over the key axis of 4-D (or head-merged 3-D) scores in their own dtype (an
  fp32 upcast not cast straight back: transformers' bf16/fp16 `softmax(x, -1, dtype=float32)
  .to(x.dtype)` is fused, since the op computes its softmax in float32 and returns q's dtype);
- an unrecognized score modifier sits between Q·Kᵀ and the softmax;
- the probabilities reach P·V through an unrecognized op, or are used outside P·V;
- head-merged (B·H, Lq, Lk) probabilities that no view shows the head count of;
- an intermediate of the attention is used elsewhere; training-mode dropout;
- q, k, v shapes, head counts or the mask/bias shape and dtype do not fit the op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import erase_dead, nodes_by_op, replace_with_call
from fxforge.ir.match import Capture, Match, NoMatch, Op, Rule, read
from fxforge.ir.match import match as match_pattern
from fxforge.ir.ops import get_op
from fxforge.ir.verify import Tolerance
from fxforge.passes.attention.layout import (
    BMMS, merge_heads_view, split_heads, split_heads_view, split_shape, untranspose_key_3d,
)
from fxforge.passes.attention.masks import classify_mask, key_rows, split_position_bias
from fxforge.passes.attention.rules import (
    SOFTMAX_RULES,
    SOFTMAX_TARGETS,
    Build,
    MaskMatch,
    Value,
    broadcasts_to,
    fake,
    additive_terms,
    mask_candidates,
    peel_repeat_kv,
    peel_scales,
    probabilities,
    same_size,
    skip_identities,
    skip_score_identities,
    untranspose_key,
)
from fxforge.passes.attention.match_helpers import ATTENTION_SINK, MATMULS, Skip, value_matmul
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass

aten = torch.ops.aten
SOFT_CAP = "tanh soft-cap on the attention scores"
# Skip reasons that name a construct the attention op cannot take, so a layer left eager for
# one of them is expected, not a gap in the matcher (the architecture sweep accepts these).
ACCEPTED_SKIP_REASONS = (SOFT_CAP, ATTENTION_SINK)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


@dataclass(frozen=True)
class AttentionMatch:
    """One attention subgraph, ready to become `attention(q, k, v, mask, is_causal, scale, groups)`."""

    root: Node  # the node whose value the op replaces (the P·V matmul or the SDPA call)
    q: Node
    k: Value
    v: Value
    mask: Value | None
    is_causal: bool
    scale: float | None
    num_kv_groups: int
    bias: Value | None = None  # additive position bias (ALiBi), already times the scores' scale
    merged_heads: int | None = None  # H when the model computes on (B·H, L, D): root is 3-D
    # the matched subgraph: erased explicitly, as an in-place `scores += bias` (MPNet) left
    # without users is not dead code to erase_dead (it mutates its input)
    removed: tuple[Node, ...] = ()


# --------------------------------------------------------------------------- eager spelling


def match_softmax(softmax: Node) -> AttentionMatch | None:
    """The attention `softmax` anchors, None if it is no attention; raises Skip with a reason."""
    probs = probabilities(softmax)  # the softmax, or its cast back from a float32 softmax
    pv = value_matmul(probs)
    if pv is None:
        return None  # a softmax that does not weight values (a router, a classifier head)
    scores_in = read(SOFTMAX_RULES, probs)
    if isinstance(scores_in, NoMatch):
        raise Skip(f"softmax '{softmax.name}' is not over the key axis of 4-D scores in their own dtype "
                   f"({scores_in.reason})")
    merged: list[Node] = []
    top_heads = None
    if fake(scores_in).dim() == 3:  # softmax over (B·H, Lq, Lk): a view above shows H (TrOCR, XGLM)
        view = skip_identities(scores_in, merged)
        top_heads = merge_heads_view(view)
        if top_heads is None:
            raise Skip(f"the probabilities '{softmax.name}' are head-merged (B·H, Lq, Lk) scores never "
                       f"viewed as (B, H, Lq, Lk), so the head count is not visible")
        merged.append(view)
        scores_in = view.args[0]
    found = _scores(scores_in, merged)
    # P·V by bmm takes (B·H, Lq, Lk) probabilities: H from the view that merged them (or the
    # scores' own layout); q, k follow the score layout, v and the output the value product's
    pv_heads = None
    if pv.target in BMMS:
        pv_heads = top_heads or merge_heads_view(pv.args[0]) or found.heads
        if pv_heads is None:
            raise Skip(f"the probabilities of softmax '{softmax.name}' reach P·V by bmm '{pv.name}' as "
                       f"(B·H, Lq, Lk) and no view shows the head count")
    removed = found.chain + _probabilities_chain(probs, pv) + [softmax]
    _require_single_use(removed[:-1], softmax)
    if found.heads is None:
        q, k, groups_k = _query_key(found.qk)
        scores_shape = tuple(fake(found.qk).shape)
    else:  # head-merged: no GQA repetition in this layout (Bloom has none)
        q, k, groups_k = _query_key_3d(found.qk, found.heads)
        scores_shape = split_shape(tuple(fake(found.qk).shape), found.heads)
    if pv_heads is None:
        v, groups_v = peel_repeat_kv(pv.args[1])
    else:
        v, groups_v = split_heads(pv.args[1], pv_heads), 1
    if found.heads is not None and pv_heads is not None and found.heads != pv_heads:
        raise Skip(f"the scores of softmax '{softmax.name}' are split into {found.heads} heads, the "
                   f"probabilities into {pv_heads}")
    scale_total = found.factor * q[1] * k[1]
    return _checked(AttentionMatch(
        root=pv, q=q[0], k=k[0], v=v, mask=found.mask, is_causal=False, scale=scale_total,
        num_kv_groups=1, bias=found.bias, merged_heads=pv_heads, removed=tuple(removed),
    ), scores_shape, groups_k, groups_v)


def _probabilities_chain(softmax: Node, pv: Node) -> list[Node]:
    """The same-dtype casts between the softmax and P·V (the softmax itself excluded)."""
    chain, node = [], pv.args[0]
    while node is not softmax:  # casts, and the merge-heads view of the head-merged layout
        chain.append(node)
        node = node.args[0]
    return chain


@dataclass
class _Scores:
    """What sits between Q·Kᵀ and the softmax: scale, mask, position bias, head layout."""

    qk: Node
    factor: float
    mask: Value | None
    bias: Value | None
    heads: int | None  # H when Q·Kᵀ is a head-merged (B·H, Lq, Lk) bmm
    chain: list[Node]  # nodes the rewrite removes (each must have a single user)


@dataclass
class _Walked:
    """One reading of the scores below the softmax's own mask (see `_walk_scores`)."""

    qk: Node
    factor: float
    biases: list[Value]
    masks: list[MaskMatch]  # where/masked_fill masks found below the top one (GPT-Neo's buffer)
    heads: int | None
    nodes: list[Node]


def _scores(scores_in: Node, passed: list[Node] | None = None) -> _Scores:
    """Read the softmax input as ((Q·Kᵀ)·scale + bias) + mask, in any order of scales and bias."""
    passed = list(passed or [])
    top = skip_score_identities(scores_in, passed)
    candidates = mask_candidates(top) + [MaskMatch(top, None, None)]  # type: ignore[arg-type]
    stops: list[object] = []
    for cand in candidates:
        found = _walk_scores(cand.scores, 1.0, None, stops)
        if found is not None:
            bias = found.biases[0] if found.biases else None
            for more in found.biases[1:]:
                bias = Build(aten.add.Tensor, (bias, more))
            chain = passed + found.nodes + ([cand.node] if cand.node is not None else [])
            masks = ([cand] if cand.node is not None else []) + found.masks
            mask = _combined(masks, found.qk, found.heads)
            split = split_position_bias(mask) if found.heads is None and len(masks) == 1 else None
            if split is not None:  # a position bias folded into the mask (Falcon-ALiBi): the op's bias
                mask, folded = split
                bias = folded if bias is None else Build(aten.add.Tensor, (bias, folded))
            return _Scores(found.qk, found.factor, mask, bias, found.heads, chain)
    # name the node where the deepest reading stopped (the softmax input itself says little)
    stopped_at = next((s for s in stops if s is not top), top)
    where = stopped_at.target if isinstance(stopped_at, Node) else type(stopped_at).__name__
    name = stopped_at.name if isinstance(stopped_at, Node) else repr(stopped_at)
    if isinstance(stopped_at, Node) and stopped_at.target == aten.tanh.default:
        raise Skip(f"{SOFT_CAP} (node '{name}', Gemma-2 style cap·tanh(S/cap)): the attention op takes "
                   f"no soft-cap, so the layer stays eager (add_kv_cache caches it as it is)")
    raise Skip(f"unrecognized score modifier {where} (node '{name}') between Q·Kᵀ and softmax: "
               f"only constant scales, additive position biases and one additive or boolean mask "
               f"are provably equivalent")


def _combined(masks: list[MaskMatch], qk: Node, heads: int | None) -> Value | None:
    """One mask for the op from the masks on the way (all bool: their AND; else their sum,
    a bool one as 0 / the dtype's lowest). Each is checked against the scores on its own."""
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0].mask
    scores_shape = tuple(fake(qk).shape) if heads is None else split_shape(tuple(fake(qk).shape), heads)
    dtype = fake(qk).dtype
    for m in masks:
        _check_mask(m.mask, scores_shape, dtype)
    if all(_mask_dtype(m.mask) == torch.bool for m in masks):
        combined = masks[0].mask
        for m in masks[1:]:
            combined = Build(aten.logical_and.default, (combined, m.mask))
        return combined
    # the largest-shaped operand first: a recipe's shape is read off its first argument
    terms = [m.mask if _mask_dtype(m.mask) != torch.bool else Build(aten.masked_fill.Scalar, (
        Build(aten.zeros_like.default, (m.mask,), (("dtype", dtype),)),
        Build(aten.logical_not.default, (m.mask,)), torch.finfo(dtype).min)) for m in masks]
    terms.sort(key=lambda t: -len(_shape(t) or ()))
    combined = terms[0]
    for t in terms[1:]:
        combined = Build(aten.add.Tensor, (combined, t))
    return combined


def _walk_scores(node: object, factor: float, heads: int | None, stops: list[object]) -> _Walked | None:
    """Q·Kᵀ, total scale, biases (each already scaled, 4-D), inner masks, heads and the nodes
    walked, or None.

    Walking down from the softmax, a scale c multiplies everything below it; a bias B found
    below scales c1..cn therefore enters the op as B·c1···cn, the scores' own scale is the
    product of all of them. Past a split-heads view the operands are (B·H, ...) and are
    unflattened into the op's layout. A where/masked_fill mask below the top one (GPT-Neo masks
    with its causal buffer, then adds the padding mask) is read under no scale, or as a bool mask
    under a positive one (scaling -inf keeps it -inf).
    """
    walked: list[Node] = []
    base = node
    while True:  # scales and softmax-invariant ops (S + 0, a floor), in any order
        before = len(walked)
        base, f, more = peel_scales(base)
        factor *= f
        walked += more
        base = skip_score_identities(base, walked)
        if len(walked) == before:
            break
    if _is_score_matmul(base, heads):
        return _Walked(base, factor, [], [], heads, walked + [base])
    split = split_heads_view(base) if heads is None else None
    if split is not None:
        found = _walk_scores(split[0], factor, split[1], stops)
        if found is not None:
            found.nodes = walked + [base] + found.nodes
        return found
    for reading in additive_terms(base):  # S + B, either side the scores
        scores, bias = reading.scores, reading.mask
        found = _walk_scores(scores, factor, heads, stops)
        if found is not None:
            term: Value = bias if heads is None else split_heads(bias, heads)
            if factor != 1.0:
                term = Build(aten.mul.Tensor, (term, factor))
            found.biases.append(term)
            found.nodes = walked + [base] + found.nodes
            return found
    for reading in _inner_masks(base, factor, heads):
        found = _walk_scores(reading.scores, factor, heads, stops)
        if found is not None:
            found.masks.append(reading)
            found.nodes = walked + [base] + found.nodes
            return found
    stops.append(base)
    return None


def _inner_masks(node: object, factor: float, heads: int | None) -> list[MaskMatch]:
    """where/masked_fill readings of `node` usable below the top mask (see `_walk_scores`)."""
    if heads is not None or not isinstance(node, Node) or node.target in (aten.add.Tensor, aten.add_.Tensor):
        return []
    readings = mask_candidates(node)
    if factor == 1.0:
        return readings
    return [r for r in readings if factor > 0 and _mask_dtype(r.mask) == torch.bool]


def _is_score_matmul(node: object, heads: int | None = None) -> bool:
    """A 4-D matmul, or (head-merged layout) a 3-D bmm."""
    targets, rank = (MATMULS, 4) if heads is None else (BMMS, 3)
    if not (isinstance(node, Node) and node.target in targets):
        return False
    vals = [fake(a) for a in node.args[:2]]
    return all(v is not None and v.dim() == rank for v in vals)


def _require_single_use(nodes: list[Node], softmax: Node) -> None:
    """Raise Skip when a node the rewrite would remove is also read by something else (a user
    outside the removed nodes and the softmax; the row maximum a model subtracts is removed too)."""
    removed = set(nodes) | {softmax}
    for node in nodes:
        outside = [u for u in node.users if u not in removed]
        if len(node.users) != 1 and outside:
            lse = next((u for u in outside if u.target == aten.logsumexp.default), None)
            if lse is not None:
                raise Skip(f"{ATTENTION_SINK} (applied as out·sigmoid(logsumexp(S) - sink), logsumexp '{lse.name}' "
                           f"of the scores '{node.name}'): the attention op takes no sink input and returns no "
                           f"logsumexp, so the layer stays eager (add_kv_cache caches it as it is)")
            users = ", ".join(u.name for u in node.users)
            raise Skip(f"intermediate '{node.name}' of the attention is also used elsewhere ({users})")


def _query_key(qk: Node) -> tuple[tuple[Node, float], tuple[Value, float], int]:
    """((q, scale on q), (k, scale on k), kv groups found on k) from Q·Kᵀ.

    Scales and the head repetition may sit on either side of the transpose of K.
    """
    q, q_factor, _ = peel_scales(qk.args[0])
    kt, k_factor, _ = peel_scales(qk.args[1])
    kt, groups = peel_repeat_kv(kt)
    kt, more, _ = peel_scales(kt)
    k = untranspose_key(kt)
    if isinstance(k, Node):
        k, even_more, _ = peel_scales(k)
        k, inner_groups = peel_repeat_kv(k)
        k_factor, groups = k_factor * more * even_more, groups * inner_groups
    else:
        k_factor *= more
    return (q, q_factor), (k, k_factor), groups


def _query_key_3d(qk: Node, heads: int) -> tuple[tuple[Value, float], tuple[Value, float], int]:
    """((q, scale), (k, scale), 1) as 4-D recipes from a head-merged bmm(q3, k3ᵀ)."""
    q, q_factor, _ = peel_scales(qk.args[0])
    kt, k_factor, _ = peel_scales(qk.args[1])
    k = untranspose_key_3d(kt)
    return (split_heads(q, heads), q_factor), (split_heads(k, heads), k_factor), 1


# --------------------------------------------------------------------------- SDPA spelling


# One row: every argument is a capture (left-out ones read as the schema's defaults), the check
# refuses what the op cannot express, the rewrite checks shapes (raising Skip) and replaces it.
SDPA_PATTERN = Op(aten.scaled_dot_product_attention.default, Capture("q"), Capture("k"), Capture("v"),
                  Capture("mask"), Capture("dropout_p"), Capture("is_causal"), Capture("scale"))


def _sdpa_refusal(found: Match) -> str | None:
    """Why SDPA cannot become the op: training dropout, or a top-left causal triangle (Lq != Lk)."""
    name = found.root.name
    if found["dropout_p"]:
        return f"scaled_dot_product_attention '{name}' has dropout_p={found['dropout_p']}; put the model in eval()"
    if found["is_causal"] and not same_size(fake(found["q"]).shape[2], fake(found["k"]).shape[2]):
        return (f"causal scaled_dot_product_attention '{name}' with query and key lengths not provably "
                f"equal: SDPA's top-left triangle differs from the op's bottom-right one")
    return None


def match_sdpa(found: Match) -> AttentionMatch:
    """The op's arguments from a matched (and accepted) SDPA call; raises Skip on shapes."""
    q, k, v, mask, is_causal, scale = (found[n] for n in ("q", "k", "v", "mask", "is_causal", "scale"))
    qv, kv = fake(q), fake(k)
    k, groups_k = peel_repeat_kv(k)
    v, groups_v = peel_repeat_kv(v)
    scores = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
    return _checked(AttentionMatch(
        root=found.root, q=q, k=k, v=v, mask=mask, is_causal=bool(is_causal),
        scale=None if scale is None else float(scale), num_kv_groups=1,
    ), scores, groups_k, groups_v)


SDPA_RULE = Rule("sdpa", SDPA_PATTERN, lambda gm, found: rewrite(gm, match_sdpa(found)), _sdpa_refusal)


# --------------------------------------------------------------------------- shared checks


def _shape(value: Value) -> tuple | None:
    if isinstance(value, Node):
        val = fake(value)
        return tuple(val.shape) if val is not None else None
    if value.target == aten.permute.default:
        src = _shape(value.args[0])
        return tuple(src[p] for p in value.args[1]) if src is not None else None
    if value.target == aten.transpose.int:
        src = _shape(value.args[0])
        return None if src is None else (*src[:-2], src[-1], src[-2])
    if value.target == aten.unflatten.int:
        src = _shape(value.args[0])
        return None if src is None else split_shape(src, value.args[2][1])
    return _shape(value.args[0])  # logical_not, zeros_like, masked_fill, mul by a scale keep the shape


def _mask_dtype(value: Value) -> torch.dtype | None:
    if isinstance(value, Node):
        val = fake(value)
        return val.dtype if val is not None else None
    if value.target == aten.logical_not.default:
        return torch.bool
    if value.target == aten.zeros_like.default:
        return dict(value.kwargs)["dtype"]
    return _mask_dtype(value.args[0])


def _checked(match: AttentionMatch, scores_shape, groups_k: int, groups_v: int) -> AttentionMatch:
    """Verify the shapes fit the op's contract and fill in num_kv_groups and is_causal."""
    q_shape, k_shape, v_shape = _shape(match.q), _shape(match.k), _shape(match.v)
    if q_shape is None or k_shape is None or v_shape is None:
        raise Skip("q, k or v has no shape metadata")
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
        raise Skip(f"q, k, v are not 4-D (batch, heads, seq, head_dim): {q_shape}, {k_shape}, {v_shape}")
    if not (same_size(q_shape[0], k_shape[0]) and same_size(k_shape[0], v_shape[0])):
        raise Skip(f"q, k, v batch sizes are not provably equal: {q_shape}, {k_shape}, {v_shape}")
    if not (same_size(q_shape[3], k_shape[3]) and same_size(k_shape[2], v_shape[2])):
        raise Skip(f"head dims or key lengths of q, k, v do not fit: {q_shape}, {k_shape}, {v_shape}")
    hq, hk, hv = q_shape[1], k_shape[1], v_shape[1]
    if not all(isinstance(h, int) for h in (hq, hk, hv)):
        raise Skip("head counts are symbolic; fuse_attention needs static head counts")
    if hk != hv or hq % hk != 0:
        raise Skip(f"{hq} query heads, {hk} key heads and {hv} value heads (repeat_kv groups {groups_k} "
                   f"and {groups_v}) are not one grouped-query layout")
    mask, is_causal = match.mask, match.is_causal
    if match.bias is not None:
        bias_shape, bias_dtype = _shape(match.bias), _mask_dtype(match.bias)
        if bias_shape is None or bias_dtype != fake_dtype(match.q):
            raise Skip(f"the additive score bias has dtype {bias_dtype}, not the scores' {fake_dtype(match.q)}")
        if not broadcasts_to(bias_shape, scores_shape):
            raise Skip(f"the additive score bias of shape {bias_shape} does not provably broadcast to the "
                       f"scores {tuple(scores_shape)}")
    if isinstance(mask, (Node, Build)):
        _check_mask(mask, scores_shape, fake_dtype(match.q))
        verdict = classify_mask(mask, match.root.graph.owning_module, scores_shape[2], scores_shape[3])
        if verdict == "causal" and same_size(scores_shape[2], scores_shape[3]):
            mask, is_causal = None, True
        elif verdict == "all":
            mask = None
        else:  # a padding mask expanded over the queries (HF BERT): its one row, key-only by shape
            mask = key_rows(mask, match.root.graph.owning_module) or mask
    elif mask is not None:
        raise Skip(f"attention mask {mask!r} is not a tensor")
    return AttentionMatch(match.root, match.q, match.k, match.v, mask, is_causal, match.scale, hq // hk,
                          match.bias, match.merged_heads, match.removed)


def fake_dtype(value: Value) -> torch.dtype | None:
    """The dtype of a node or of a recipe (a recipe keeps its first argument's dtype)."""
    return _mask_dtype(value)


def _check_mask(mask: Value, scores_shape, q_dtype: torch.dtype) -> None:
    shape, dtype = _shape(mask), _mask_dtype(mask)
    if shape is None or dtype is None:
        raise Skip("the attention mask has no shape metadata")
    if dtype != torch.bool and dtype != q_dtype:
        raise Skip(f"the attention mask has dtype {dtype}, neither bool nor the scores' {q_dtype}")
    if not broadcasts_to(shape, scores_shape):
        raise Skip(f"the attention mask of shape {shape} does not provably broadcast to the scores "
                   f"{tuple(scores_shape)}")


# --------------------------------------------------------------------------- rewrite


def _emit(gm: GraphModule, before: Node, value: object) -> object:
    """Materialize a Build recipe (recursively) right before `before`; nodes pass through."""
    if not isinstance(value, Build):
        return value
    args = tuple(_emit(gm, before, a) for a in value.args)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(value.target, args, dict(value.kwargs))
    node.meta["module_path"] = before.meta.get("module_path", "")
    return node


def rewrite(gm: GraphModule, match: AttentionMatch) -> Node:
    """Replace `match.root` by one fxforge::attention call; the old subgraph is erased."""
    root = match.root
    q = _emit(gm, root, match.q)
    k = _emit(gm, root, match.k)
    v = _emit(gm, root, match.v)
    mask = _emit(gm, root, match.mask)
    args = (q, k, v, mask, match.is_causal, match.scale, match.num_kv_groups)
    if match.bias is not None:  # only then: graphs without a bias keep the 7-argument call
        args += (_emit(gm, root, match.bias),)
    op = get_op("attention").overload
    if match.merged_heads is None:
        node = replace_with_call(gm, root, op, args)
    else:
        with gm.graph.inserting_before(root):
            node = gm.graph.call_function(op, args)
            merged = gm.graph.call_function(aten.flatten.using_ints, (node, 0, 1))  # back to (B·H, L, Dv)
        for new in (node, merged):
            new.meta["module_path"] = root.meta.get("module_path", "")
        root.replace_all_uses_with(merged)
        erase_dead(gm)
    _erase_matched(gm, match.removed)
    return node


def _erase_matched(gm: GraphModule, nodes: tuple[Node, ...]) -> None:
    """Erase what is left of the matched subgraph (in-place ops erase_dead keeps), users first."""
    left = [n for n in nodes if not getattr(n, "_erased", False) and n.graph is gm.graph]
    if not left:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(left, key=lambda n: -order.get(n, -1)):
        if node in order and not node.users:
            gm.graph.erase_node(node)
    erase_dead(gm)


def _where(node: Node) -> str:
    return node.meta.get("module_path") or node.name


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Replace every provable attention subgraph (eager spellings and SDPA) by fxforge::attention."""

    name = "fuse_attention"
    reorders_float_math = True  # a bf16 model's fused softmax·V rounds once, eager rounds P then P·V

    def tolerance(self) -> Tolerance:
        # Exact up to float32 summation order: the fused op computes softmax(QKᵀ)V in one
        # kernel. On a 4-layer TinyLlama-shaped model (hidden 2048, vocab 32000) that moved the
        # logits by 1.5e-5 max abs at relative L2 1.1e-6 (bench/llm_e2e.py), past the default
        # 1e-5; add_kv_cache declares the same bound for the same reason. A wrong mask, scale or
        # head layout moves outputs by orders of magnitude more.
        return Tolerance(max_abs=1e-4, rtol=1e-4)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        fused, skipped = 0, []
        anchors = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_TARGETS]
        for softmax in anchors:
            if getattr(softmax, "_erased", False):  # removed with an earlier rewrite's dead code
                continue
            try:
                match = match_softmax(softmax)
            except Skip as why:
                skipped.append((_where(softmax), str(why)))
                continue
            if match is not None:
                rewrite(gm, match)
                fused += 1
        for sdpa in list(nodes_by_op(gm, aten.scaled_dot_product_attention.default)):
            found = match_pattern(SDPA_RULE.pattern, sdpa)  # always matches: every argument is a capture
            try:
                refusal = SDPA_RULE.check(found)
                if refusal:
                    raise Skip(refusal)
                SDPA_RULE.rewrite(gm, found)
            except Skip as why:
                skipped.append((_where(sdpa), str(why)))
                continue
            fused += 1
        if not fused and not skipped:  # never a silent zero (e.g. fuse_attention twice)
            skipped.append(("<graph>", "no softmax attention left to fuse (an fxforge::attention op or no attention)"))
        return PassResult(gm, sites=fused, skipped=skipped)
