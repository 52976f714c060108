"""Projections: the `fuse_projections` pass (q/k/v and gate/up linears reading one input -> one
wider linear, split after).

fuse_projections.py  the pass
groups.py            which linears form a group (same input, compatible kinds, adapters)
kinds.py             the linear kinds that can fuse (plain, weight-quantized, ...) and their layouts
rewrite.py           builds the fused linear and the split
"""
