"""Test helper: the tiny code-lm traced with fused attention, for the KV-cache and Medusa tests.

Uses the `fuse_attention` pass when it is registered. Until then, it routes the model's
attention through transformers' AttentionInterface to `fxforge::attention` directly, so the
traced graph has the same fused op the pass would emit (causal, no mask, GQA groups).
"""
from __future__ import annotations

import copy
import functools

import torch

ATTN_NAME = "fxforge_test_attention"


def _fxforge_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    out = torch.ops.fxforge.attention(query, key, value, None, True, scaling, groups)
    return out.transpose(1, 2).contiguous(), None


def has_fuse_attention() -> bool:
    from fxforge.passes.base import registered_passes

    return "fuse_attention" in registered_passes()


@functools.lru_cache(maxsize=None)
def tiny_code_lm():
    from fxforge.models.code_lm import load_code_lm

    return load_code_lm("tiny")


def fused_model():
    """(model with fused attention, passes to run first): a copy of the tiny code-lm."""
    from transformers import AttentionInterface

    import fxforge.ir.ops  # noqa: F401  (defines fxforge::attention)

    model = copy.deepcopy(tiny_code_lm().model).eval()
    if has_fuse_attention():
        return model, ["fuse_attention"]
    AttentionInterface.register(ATTN_NAME, _fxforge_attention)
    model.config._attn_implementation = ATTN_NAME
    return model, []


def example_ids(batch: int = 1, seq: int = 12) -> torch.Tensor:
    lm = tiny_code_lm()
    return lm.heldout_batches(seq_len=seq, max_batches=1, batch_size=batch)[0]
