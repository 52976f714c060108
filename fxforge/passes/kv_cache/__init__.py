"""KV cache: the `add_kv_cache` pass and its helpers.

add_kv_cache.py  the pass: past keys/values as inputs, present ones as outputs, position ids
sites.py         finds each attention to cache (fused `fxforge::attention` or eager softmax)
bias.py          extends position biases (ALiBi) over the cached keys
padding.py       the causal mask built in-graph from an HF padding mask (attention_mask=True)
window.py        the tree/padding mask narrowed to a sliding window for layers that have one
positions.py     counted positions (cumsum of a per-token mask) and position tables -> position_ids
token_mixing.py  refuses what a KV cache cannot hold: per-tensor W8A8 scales, sequence mixers
                 outside attention (convolutions, scans, linear attention)

The cache layout the runtime reads (`KV_META`, a typed `KVCacheLayout`) and the input builders
live in `fxforge/runtime/` (`meta_keys.py`, `layouts.py`, `cache_inputs.py`), so the runtime
never imports passes.
"""
