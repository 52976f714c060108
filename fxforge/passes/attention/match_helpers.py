"""What recognizing an attention shares between `fuse_attention` and the kv_cache family:
`Skip` (a candidate left alone, with the reason) and `value_matmul` (the P·V product the
probabilities feed). A module of its own so kv_cache code does not import the fuse_attention pass.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxforge.passes.attention.layout import BMMS, VIEWS, merge_heads_view
from fxforge.passes.attention.rules import (
    SOFTMAX_TARGETS, fake, only_user, same_size, sink_columns, skip_identities, skip_score_identities,
)

__all__ = ["Skip", "value_matmul", "MATMULS", "ATTENTION_SINK"]

aten = torch.ops.aten
MATMULS = (aten.matmul.default,)
_DROPOUTS = (aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default)


class Skip(Exception):
    """A candidate that cannot be proven equivalent; the message is the reason reported."""


ATTENTION_SINK = "attention sink"


def _sink_slice(probs: Node, user: Node) -> Node | None:
    """The appended sink columns' cat when `user` slices them off the probabilities, else None:
    probs = softmax(cat([S, sink], -1)), user = probs[..., :Lk] (GPT-OSS, MiMo)."""
    if user.target != aten.slice.Tensor or user.args[0] is not probs:
        return None
    softmax = probs
    while softmax.target not in SOFTMAX_TARGETS and softmax.args and isinstance(softmax.args[0], Node):
        softmax = softmax.args[0]  # the cast back of a float32 softmax
    cat = skip_score_identities(softmax.args[0]) if softmax.target in SOFTMAX_TARGETS else None
    found = sink_columns(cat)
    val, out = fake(user.args[0]), fake(user)
    if found is None or val is None or out is None:
        return None
    dim, start = user.args[1], user.args[2] if len(user.args) > 2 else 0
    step = user.args[4] if len(user.args) > 4 else 1
    if int(dim) % val.dim() != val.dim() - 1 or start not in (0, None) or step != 1:
        return None
    scores = fake(found[0])
    return cat if same_size(scores.shape[-1], out.shape[-1]) else None


def value_matmul(softmax: Node, through_sinks: bool = False) -> Node | None:
    """The matmul P @ V that the probabilities feed (through same-dtype casts), else None.

    A slice that drops appended sink columns (see `rules.SINK_COLUMNS_RULE`) raises Skip naming
    the attention sink, or with `through_sinks` (add_kv_cache, which keeps the model's ops) is
    looked through."""
    node = softmax
    while True:
        user = only_user(node)
        sink = _sink_slice(node, user) if user is not None else None
        if sink is not None:
            if not through_sinks:
                raise Skip(f"{ATTENTION_SINK} (a learned logit concatenated to the scores at '{sink.name}' and "
                           f"sliced off the probabilities at '{user.name}'): the attention op takes no sink "
                           f"input, so the layer stays eager (add_kv_cache caches it as it is)")
            node = user
            continue
        user = only_user(node)
        if user is None:
            if any(u.target in MATMULS and u.args[0] is node for u in node.users):
                raise Skip(f"the attention probabilities '{node.name}' are also used outside P·V "
                           f"(by {', '.join(u.name for u in node.users)})")
            return None
        if user.target in _DROPOUTS:
            raise Skip(f"training-mode dropout '{user.name}' on the probabilities; put the model in eval()")
        if user.target in MATMULS:
            return user if user.args[0] is node else None
        if user.target in BMMS:
            # a softmax over (B·H, Lq, Lk) scores straight into bmm (BART/TrOCR-style): the
            # matcher reads the head count off the view that made the scores 3-D
            return user if user.args[0] is node else None
        if merge_heads_view(user) is not None:  # probs.view(B·H, Lq, Lk) @ v3 (Bloom)
            pv = only_user(user)
            return pv if pv is not None and pv.target in BMMS and pv.args[0] is user else None
        back = _view_round_trip(user)
        if back is not None:  # probs.view(B, H, Lq, Lk).view(B·H, Lq, Lk) (XGLM): the same tensor
            node = back
            continue
        if skip_identities(user) is not node:
            _raise_if_weights_values(user)
            return None
        node = user


def _view_round_trip(view: Node) -> Node | None:
    """The last of a chain of single-use views starting at `view` that gives back the shape of
    the tensor `view` reads (so the chain is the identity), else None."""
    source, node = fake(view.args[0]) if view.args else None, view
    if source is None or view.target not in VIEWS:
        return None
    while node.target in VIEWS:
        val = fake(node)
        if val is not None and node is not view and val.dim() == source.dim() and all(
                same_size(a, b) for a, b in zip(val.shape, source.shape)):
            return node
        nxt = only_user(node)
        if nxt is None or nxt.args[0] is not node:
            return None
        node = nxt
    return None


def _raise_if_weights_values(user: Node, depth: int = 4) -> None:
    """Skip (naming `user`) when the probabilities still reach a P·V matmul through it.

    Without this, a softmax whose path to its value matmul passes an op the matcher does not
    know would be left unfused with no reason given.
    """
    node = user
    for _ in range(depth):
        nxt = only_user(node)
        if nxt is None:
            return
        if (nxt.target in MATMULS or nxt.target in BMMS) and nxt.args[0] is node:
            raise Skip(f"the attention probabilities reach P·V through {user.target} (node '{user.name}'), "
                       f"which is neither a same-dtype cast, a same-shape view nor a head-merging view")
        node = nxt
