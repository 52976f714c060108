"""What a pass may read besides the graph: `PassContext` (example inputs, calibration data, seed,
progress bars) and the default progress factory."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from torch.fx import GraphModule

from fxforge.calibration.data import CalibrationData, checked_batches, empty_calibration, missing_calibration

__all__ = ["PassContext", "default_progress"]


def default_progress(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """A tqdm progress bar; silent when FXFORGE_PROGRESS=0."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", os.environ.get("FXFORGE_PROGRESS", "1") == "0")
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    example_inputs: the flat inputs the graph takes (used for verification).
    calibration: an iterable of model inputs for data-driven passes, generators included. Each
        item is a tensor (the first input), a tuple of positional inputs, a dict keyed by input
        name, or an (args, kwargs) pair. It is wrapped in a `CalibrationData` that reads the
        source once and caches it, so every pass sees the same batches. Passes read it only
        through `calibration_batches(gm, limit, pass_name=...)`, which checks every batch.
    seed: for any randomness a pass uses (initializations, sampling).
    progress: a tqdm-like factory: `ctx.progress(iterable, desc=..., total=...)`.
    """

    example_inputs: tuple[Any, ...] = ()
    calibration: Iterable[Any] | None = None
    seed: int = 0
    progress: Callable[..., Any] = default_progress
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # read once, here: a generator shared by two calibrated passes must feed both
        self.calibration = CalibrationData.wrap(self.calibration)

    def require_calibration(self, pass_name: str, what: str | None = None, *, method: str | None = None,
                            hint: str = "") -> CalibrationData:
        """The calibration data, or a CalibrationError naming the pass (and `method`) when there
        is none or it is empty. Call it before doing any work, so a pass fails first thing."""
        self.calibration = CalibrationData.wrap(self.calibration)  # in case it was assigned after construction
        if self.calibration is None:
            raise missing_calibration(pass_name, method, what, hint)
        if not self.calibration.read(1):
            raise empty_calibration(pass_name, method)
        return self.calibration

    def calibration_batches(self, gm: GraphModule, limit: int | None = None, *, pass_name: str | None = None,
                            method: str | None = None) -> Iterator[list[Any]]:
        """Calibration items in the flat positional form `gm` takes, at most `limit` of them.

        Each is checked against `gm`'s inputs (type, rank, sizes, dtype, vocabulary, finite
        values) and a CalibrationError names the pass, the batch and the input at fault. With
        `pass_name`, missing or empty calibration is an error; without it (callers for whom data
        is optional), missing calibration yields nothing.
        """
        self.calibration = CalibrationData.wrap(self.calibration)  # in case it was assigned after construction
        return checked_batches(gm, self.calibration, limit, pass_name=pass_name, method=method)
