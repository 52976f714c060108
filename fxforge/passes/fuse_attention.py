"""Pass `fuse_attention`: every spelling of softmax(Q·Kᵀ·scale + mask)·V -> fxforge::attention.

    softmax(((Q·c1) @ (K·c2)ᵀ)·c3 + M) @ V           -> attention(Q, K, V, M, False, c1·c2·c3, 1)
    softmax(where(b, S, -inf)) @ V                      -> attention(..., mask=b, ...)
    ... @ repeat_kv(K, g), ... @ repeat_kv(V, g)        -> attention(Q, K, V, ..., num_kv_groups=g)
    aten.scaled_dot_product_attention(q, k, v, m, ...)  -> attention(q, k, v, m, ...)

Anchored at each softmax: walk up through the mask and the scale factors to the score matmul
Q·Kᵀ, and down (through same-dtype casts; eval dropout is already gone) to the value matmul.
The recognizers are the rule tables of `attention_rules.py`. The model's own mask computation
is kept and feeds the op's `attn_mask`; `is_causal=True` is set only where `attention_masks.py`
proves a mask purely causal (then the mask is dropped). A softmax feeding a matmul that cannot
be proven equivalent (a tanh softcap, probabilities reused elsewhere, training dropout, ...) is
left untouched and listed in `PassResult.skipped` with the reason: nothing is rewritten until
the whole subgraph has matched. Exact: the default tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxforge.ir.graph import nodes_by_op, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.passes.attention_masks import classify_mask
from fxforge.passes.attention_rules import (
    SOFTMAX_RULES,
    SOFTMAX_TARGETS,
    Build,
    MaskMatch,
    Value,
    apply_rules,
    broadcasts_to,
    fake,
    mask_candidates,
    only_user,
    peel_repeat_kv,
    peel_scales,
    same_size,
    skip_identities,
    untranspose_key,
)
from fxforge.passes.base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
_MATMULS = (aten.matmul.default,)
_DROPOUTS = (aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default)
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


class Skip(Exception):
    """A candidate that cannot be proven equivalent; the message is the reason reported."""


# --------------------------------------------------------------------------- eager spelling


def match_softmax(softmax: Node) -> AttentionMatch | None:
    """The attention `softmax` anchors, None if it is no attention; raises Skip with a reason."""
    pv = value_matmul(softmax)
    if pv is None:
        return None  # a softmax that does not weight values (a router, a classifier head)
    scores_in = apply_rules(SOFTMAX_RULES, softmax)
    if scores_in is None:
        raise Skip(f"softmax '{softmax.name}' is not over the key axis of 4-D scores in their own dtype")
    qk, scale, mask, chain = _scores(scores_in)
    _require_single_use(chain + _probabilities_chain(softmax, pv))
    q, k, groups_k = _query_key(qk)
    v, groups_v = peel_repeat_kv(pv.args[1])
    scale_total = scale * q[1] * k[1]
    return _checked(AttentionMatch(
        root=pv, q=q[0], k=k[0], v=v, mask=mask, is_causal=False, scale=scale_total,
        num_kv_groups=1,
    ), tuple(fake(qk).shape), groups_k, groups_v)


def value_matmul(softmax: Node) -> Node | None:
    """The matmul P @ V that the probabilities feed (through same-dtype casts), else None."""
    node = softmax
    while True:
        user = only_user(node)
        if user is None:
            if any(u.target in _MATMULS and u.args[0] is node for u in node.users):
                raise Skip(f"the attention probabilities '{node.name}' are also used outside P·V "
                           f"(by {', '.join(u.name for u in node.users)})")
            return None
        if user.target in _DROPOUTS:
            raise Skip(f"training-mode dropout '{user.name}' on the probabilities; put the model in eval()")
        if user.target in _MATMULS:
            return user if user.args[0] is node else None
        if skip_identities(user) is not node:
            return None
        node = user


def _probabilities_chain(softmax: Node, pv: Node) -> list[Node]:
    """The same-dtype casts between the softmax and P·V (the softmax itself excluded)."""
    chain, node = [], pv.args[0]
    while node is not softmax:
        chain.append(node)
        node = node.args[0]
    return chain


def _scores(scores_in: Node) -> tuple[Node, float, Value | None, list[Node]]:
    """(Q·Kᵀ matmul, scale on the scores, mask, nodes between them) for the softmax input."""
    passed: list[Node] = []
    top = skip_identities(scores_in, passed)
    candidates = mask_candidates(top) + [MaskMatch(top, None, None)]  # type: ignore[arg-type]
    stops = []
    for cand in candidates:
        base, factor, walked = peel_scales(cand.scores)
        if _is_score_matmul(base):
            chain = passed + walked + [base] + ([cand.node] if cand.node is not None else [])
            return base, factor, cand.mask, chain
        stops.append(base)
    # name the node where the deepest reading stopped (the softmax input itself says little)
    stopped_at = next((s for s in stops if s is not top), top)
    where = stopped_at.target if isinstance(stopped_at, Node) else type(stopped_at).__name__
    name = stopped_at.name if isinstance(stopped_at, Node) else repr(stopped_at)
    raise Skip(f"unrecognized score modifier {where} (node '{name}') between Q·Kᵀ and softmax: "
               f"only constant scales and one additive or boolean mask are provably equivalent")


def _is_score_matmul(node: object) -> bool:
    if not (isinstance(node, Node) and node.target in _MATMULS):
        return False
    vals = [fake(a) for a in node.args[:2]]
    return all(v is not None and v.dim() == 4 for v in vals)


def _require_single_use(nodes: list[Node]) -> None:
    """Raise Skip when a node the rewrite would remove is also read by something else."""
    for node in nodes:
        if len(node.users) != 1:
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


# --------------------------------------------------------------------------- SDPA spelling


def match_sdpa(node: Node) -> AttentionMatch:
    """aten.scaled_dot_product_attention -> the op (top-left causal needs Lq == Lk); raises Skip."""
    values = list(node.args) + list(_SDPA_DEFAULTS[len(node.args):])
    for i, name in enumerate(_SDPA_ARGS):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    q, k, v, mask, dropout_p, is_causal, scale, _enable_gqa = values
    if dropout_p:
        raise Skip(f"scaled_dot_product_attention '{node.name}' has dropout_p={dropout_p}; put the model in eval()")
    qv, kv = fake(q), fake(k)
    if is_causal and not same_size(qv.shape[2], kv.shape[2]):
        raise Skip(f"causal scaled_dot_product_attention '{node.name}' with query and key lengths not provably "
                   f"equal: SDPA's top-left triangle differs from the op's bottom-right one")
    k, groups_k = peel_repeat_kv(k)
    v, groups_v = peel_repeat_kv(v)
    scores = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
    return _checked(AttentionMatch(
        root=node, q=q, k=k, v=v, mask=mask, is_causal=bool(is_causal),
        scale=None if scale is None else float(scale), num_kv_groups=1,
    ), scores, groups_k, groups_v)


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
    return _shape(value.args[0])  # logical_not, zeros_like, masked_fill keep their input's shape


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
    if isinstance(mask, (Node, Build)):
        _check_mask(mask, scores_shape, fake(match.q).dtype)
        verdict = classify_mask(mask, match.root.graph.owning_module, scores_shape[2], scores_shape[3])
        if verdict == "causal" and same_size(scores_shape[2], scores_shape[3]):
            mask, is_causal = None, True
        elif verdict == "all":
            mask = None
    elif mask is not None:
        raise Skip(f"attention mask {mask!r} is not a tensor")
    return AttentionMatch(match.root, match.q, match.k, match.v, mask, is_causal, match.scale, hq // hk)


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
    k = _emit(gm, match.root, match.k)
    v = _emit(gm, match.root, match.v)
    mask = _emit(gm, match.root, match.mask)
    args = (match.q, k, v, mask, match.is_causal, match.scale, match.num_kv_groups)
    return replace_with_call(gm, match.root, get_op("attention").overload, args)


def _where(node: Node) -> str:
    return node.meta.get("module_path") or node.name


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Replace every provable attention subgraph (eager spellings and SDPA) by fxforge::attention."""

    name = "fuse_attention"

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
            try:
                match = match_sdpa(sdpa)
            except Skip as why:
                skipped.append((_where(sdpa), str(why)))
                continue
            rewrite(gm, match)
            fused += 1
        return PassResult(gm, sites=fused, skipped=skipped)
