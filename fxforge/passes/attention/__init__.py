"""Attention: the `fuse_attention` pass and what recognizes attention in a graph.

fuse_attention.py  the pass: every spelling of softmax(Q·Kᵀ·scale + mask)·V -> fxforge::attention
rules.py           `ir.match` Rule tables, one row per spelling of each piece (a new attention spelling goes here)
masks.py           proves a mask causal (abstract interpretation of the mask computation)
layout.py          head layouts: split/merged heads, 3-D (B·H, L, D) views, transposed keys
match_helpers.py   what the kv_cache family shares with the pass: `Skip`, `value_matmul`

Importing this package imports none of them (the pass registry loads the pass by name).
"""
