"""Pruning passes: `prune` (structured: remove heads and channels found by `ir.depgraph`) and
`sparsify` (unstructured or N:M: zero weights in place and record the mask).

prune.py      the `prune` pass: candidate groups, unit selection, compensation, surgery
magnitude.py  flap.py  wanda_sp.py   one `prune` method class each (unit scores of a group)
scoring.py    what the methods share: the PruneMethod base, standardization, selection
surgery.py    the physical rewrite: slice weights, rewrite reshape/split sizes in the graph
sparsify.py   the `sparsify` pass (ratio or N:M; records masks)
sparsify_methods.py   its method classes: magnitude, wanda, dsnot
masks.py      sparsify's mask math: unstructured / N:M keep-masks, DSnoT's refinement
"""
