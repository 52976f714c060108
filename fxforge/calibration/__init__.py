"""Calibration: the data passes calibrate on, and the engine that gathers statistics from it.

    data.py       CalibrationData: reads `calibration=` once, checks every batch against the
                  traced inputs (rank, sizes, dtype, vocabulary, finite values).
    text.py       from_texts / read_calibration_file: text samples (a .txt or .jsonl file) ->
                  token windows in the form `calibration=` takes.

    observers.py  Observer and InputStatistics: Gram Σxᵀx, abs-mean, moments (n, Σx, Σx²), row
                  samples, in float32, one bundle per distinct input node, `all_reduce()` for
                  torch.distributed.
    blocks.py     split_blocks: the graph cut into prologue, its repeated blocks (by
                  `module_path`, e.g. model.layers.N) and epilogue; the values crossing each cut.
    engine.py     calibrate(gm, ctx, requests, rewrite_block=...): statistics block by block;
                  each block rewritten by the method and re-run so later blocks see it; or, without
                  rewrite_block, every block's statistics in one sweep.

Import what you need from the submodules; this package imports nothing heavier than torch
on its own.
"""
from fxforge.calibration.text import from_texts, read_calibration_file

__all__ = ["from_texts", "read_calibration_file"]
