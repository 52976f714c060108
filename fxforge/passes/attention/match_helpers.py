"""What recognizing an attention shares between `fuse_attention` and the kv_cache family:
`Skip` (a candidate left alone, with the reason) and `value_matmul` (the P·V product the
probabilities feed). A module of its own so kv_cache code does not import the fuse_attention pass.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxforge.passes.attention.layout import BMMS, VIEWS, merge_heads_view
from fxforge.passes.attention.rules import fake, only_user, same_size, skip_identities

__all__ = ["Skip", "value_matmul", "MATMULS"]

aten = torch.ops.aten
MATMULS = (aten.matmul.default,)
_DROPOUTS = (aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default)


class Skip(Exception):
    """A candidate that cannot be proven equivalent; the message is the reason reported."""


def value_matmul(softmax: Node) -> Node | None:
    """The matmul P @ V that the probabilities feed (through same-dtype casts), else None."""
    node = softmax
    while True:
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
