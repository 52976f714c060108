"""Pruning passes: `prune` (structured: remove heads and channels found by `ir.depgraph`) and
`sparsify` (unstructured or N:M: zero weights in place and record the mask).

prune.py      the `prune` pass: candidate groups, unit selection, compensation, surgery
magnitude.py  flap.py  wanda_sp.py   one scoring method each (unit scores of a group)
scoring.py    what the methods share: per-unit aggregation, standardization, selection
capture.py    calibration statistics at the inputs of linear layers (mean, variance, norm)
surgery.py    the physical rewrite: slice weights, rewrite reshape/split sizes in the graph
sparsify.py   the `sparsify` pass (magnitude, wanda, dsnot; ratio or N:M)
"""
