"""Test helper: the tiny code-lm and the passes that give it fused attention.

The KV-cache, decoding and Medusa tests all run on the tiny code-lm (trained and cached on first
use) with `fuse_attention` applied, which turns its eager attention into `fxforge::attention`.
"""
from __future__ import annotations

import copy
import functools

import torch


@functools.lru_cache(maxsize=None)
def tiny_code_lm():
    from fxforge.models.code_lm import load_code_lm

    return load_code_lm("tiny")


def fused_model():
    """(a copy of the tiny code-lm, the passes that fuse its attention)."""
    return copy.deepcopy(tiny_code_lm().model).eval(), ["fuse_attention"]


def example_ids(batch: int = 1, seq: int = 12) -> torch.Tensor:
    """Held-out token windows of the tiny code-lm, (batch, seq)."""
    return tiny_code_lm().heldout_batches(seq_len=seq, max_batches=1, batch_size=batch)[0]


@functools.lru_cache(maxsize=None)
def _graph(fused: bool):
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.ir.trace import trace
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import run_pass
    from fxforge.passes.registry import get_pass_class

    model, passes = fused_model()
    ids = example_ids(batch=2, seq=12)
    gm = trace(model, (ids,))
    canonicalize(gm)
    for name in passes if fused else []:
        gm = run_pass(get_pass_class(name)(), gm, PassContext(example_inputs=(ids,)))
    return gm, ids


def fused_graph(fused: bool = True):
    """(a copy of the tiny code-lm's canonical, attention-fused graph, its example ids (2, 12)).

    `fused=False`: the same graph with its attention as the model wrote it (eager ops).
    Traced once per test session: tracing is the slow part of these tests.
    """
    gm, ids = _graph(fused)
    return copy.deepcopy(gm), ids
