"""What recognizing an attention shares between `fuse_attention` and the kv_cache family:
`Skip` (a candidate left alone, with the reason) and `value_matmul` (the P·V product the
probabilities feed). A module of its own so kv_cache code does not import the fuse_attention pass.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxforge.passes.attention.layout import BMMS, merge_heads_view
from fxforge.passes.attention.rules import only_user, skip_identities

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
        if user.target in BMMS and user.args[0] is node:
            # a softmax over (B·H, Lq, Lk) scores straight into bmm (BART/TrOCR-style): no view
            # shows the head count, so q, k, v cannot be split into the op's 4-D layout
            raise Skip(f"the probabilities '{node.name}' are head-merged (B·H, Lq, Lk) and reach P·V by "
                       f"bmm '{user.name}' without a 4-D view, so the head count is not visible")
        if merge_heads_view(user) is not None:  # probs.view(B·H, Lq, Lk) @ v3 (Bloom)
            pv = only_user(user)
            return pv if pv is not None and pv.target in BMMS and pv.args[0] is user else None
        if skip_identities(user) is not node:
            _raise_if_weights_values(user)
            return None
        node = user


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
