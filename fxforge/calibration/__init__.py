"""Calibration: the data passes calibrate on, and the engine that gathers statistics from it.

    data.py       CalibrationData: reads `calibration=` once, checks every batch against the
                  traced inputs (rank, sizes, dtype, vocabulary, finite values).

The layer-by-layer engine (observers, block splitting, sequential capture) and the text
helpers (`from_texts`) live next to it. Import what you need from the submodules; this
package imports nothing heavy on its own.
"""
