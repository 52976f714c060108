"""Flat inputs of a graph rewritten by `add_kv_cache`, built from its layout (`gm.meta[KV_META]`,
a `runtime.layouts.KVCacheLayout`): the new tokens, their positions, the mask (tree mask, or
the padding `attention_mask`) and the past keys/values, each at the index the layout records.
Used by the pass (to verify itself), the runtime (to decode) and exports.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fxforge.runtime.layouts import KVCacheLayout

__all__ = ["cached_inputs", "causal_tree_mask", "empty_past", "random_past_inputs"]


def random_past_inputs(meta: KVCacheLayout, ids: torch.Tensor, past_len: int) -> tuple[Any, ...]:
    """Flat cached-graph inputs: new tokens `ids` after a random past of `past_len` positions.

    For export and verification: with batch, past and new lengths distinct (and above 1) an
    export keeps every cache dimension dynamic instead of specializing it.
    """
    batch = ids.shape[0]
    dtype = meta.torch_dtype
    generator = torch.Generator().manual_seed(0)
    past = []
    for heads, key_dim, value_dim in meta.kv_shapes:
        past.append(torch.randn(batch, heads, past_len, key_dim, dtype=dtype, generator=generator))
        past.append(torch.randn(batch, heads, past_len, value_dim, dtype=dtype, generator=generator))
    return tuple(cached_inputs(meta, ids, past_len, past))


def empty_past(meta: KVCacheLayout, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero-length past keys/values, flat [k0, v0, k1, v1, ...], for a prefill."""
    out = []
    for heads, key_dim, value_dim in meta.kv_shapes:
        out.append(torch.zeros(batch, heads, 0, key_dim, dtype=dtype))
        out.append(torch.zeros(batch, heads, 0, value_dim, dtype=dtype))
    return out


def causal_tree_mask(batch: int, new_len: int, past_len: int) -> torch.Tensor:
    """(B, 1, L, P + L) bool: every past key visible, causal over the new tokens."""
    tri = torch.ones(new_len, new_len, dtype=torch.bool).tril()
    full = torch.cat([torch.ones(new_len, past_len, dtype=torch.bool), tri], dim=1)
    return full.expand(batch, 1, new_len, past_len + new_len).contiguous()


def cached_inputs(meta: KVCacheLayout, ids: torch.Tensor, past_len: int, past: Sequence[torch.Tensor],
                  positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                  tree_parents: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None) -> list[Any]:
    """The cached graph's flat inputs for new tokens `ids` after `past_len` cached ones.

    Defaults: consecutive positions and a causal mask (plain decoding / prefill); for a graph
    with a padding mask, all ones (B, past_len + L). Graphs that verify a Medusa tree in-graph
    (`runtime.greedy_verify`) also take the tree's parent indices; by default none (-1): every
    token counts as accepted.
    """
    batch, length = ids.shape
    if positions is None:
        positions = torch.arange(past_len, past_len + length).expand(batch, length)
    flat: list[Any] = [None] * meta.num_inputs
    flat[meta.input_ids] = ids
    flat[meta.position_ids] = positions
    if meta.padding_mask:
        if tree_mask is not None:
            raise ValueError("this cached graph takes attention_mask (B, past + new), not a tree mask; "
                             "compile with add_kv_cache (attention_mask=False) for tree decoding")
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + length, dtype=torch.long)
        flat[meta.mask] = attention_mask
    else:
        if attention_mask is not None:
            raise ValueError("this cached graph takes a tree mask, not attention_mask; compile with "
                             "add_kv_cache(attention_mask=True) for padded batches")
        flat[meta.mask] = causal_tree_mask(batch, length, past_len) if tree_mask is None else tree_mask
    for (k_index, v_index), k, v in zip(meta.past, past[0::2], past[1::2]):
        flat[k_index], flat[v_index] = k, v
    if meta.tree_parents is not None:
        flat[meta.tree_parents] = torch.full((length,), -1) if tree_parents is None else tree_parents
    return flat
