"""What every zoo model is (`ZooModel`) and what its factories share (`seeded`,
`ModelUnavailableError`). The factories (`hf_tiny.py`, `mlp.py`, `code_lm.py`, ...) import this
module; the zoo's registry (`zoo.py`) imports the factories lazily, by name."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fxforge.errors import FxforgeError

__all__ = ["ZooModel", "ZooFactory", "ModelUnavailableError", "seeded"]


class ModelUnavailableError(FxforgeError, ImportError):
    """A zoo model needs files or a package that is not installed."""


@dataclass
class ZooModel:
    """A model ready to trace: module, example inputs and how its input sizes may vary.

    `make_inputs(batch=, seq=)` returns `(args, kwargs)` shaped like `args`/`kwargs` but of
    another size, within the ranges `dynamic_shapes` declares (models without a sequence axis
    ignore `seq`).
    """

    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    dynamic_shapes: dict | tuple | None
    description: str
    make_inputs: Callable[..., tuple[tuple, dict]]


ZooFactory = Callable[[int], ZooModel]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to `seed`, restoring the caller's RNG after.

    Factories build their random weights inside it, so `get_model(name, seed)` is reproducible
    without disturbing the RNG stream of whoever called it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
