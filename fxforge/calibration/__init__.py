"""Calibration: the data passes calibrate on, and the engine that gathers statistics from it.

    data.py       CalibrationData: reads `calibration=` once, checks every batch against the
                  traced inputs (rank, sizes, dtype, vocabulary, finite values).
    text.py       from_texts / read_calibration_file: text samples (a .txt or .jsonl file) ->
                  token windows in the form `calibration=` takes.

The layer-by-layer engine (observers, block splitting, sequential capture) lives next to them.
This package imports nothing heavier than torch on its own.
"""
from fxforge.calibration.text import from_texts, read_calibration_file

__all__ = ["from_texts", "read_calibration_file"]
