"""Proofs about attention masks for pass `fuse_attention`: is a mask purely causal, or all-visible?

(stub, replaced below)
"""
from __future__ import annotations

from torch.fx import Node


def classify_mask(mask: Node) -> str | None:
    return None
