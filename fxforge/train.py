"""`fit`: a small training loop for compiled models (adapters, heads), with a progress bar.

    compiled = fxforge.compile(model, args, passes="add_adapters(rank=8)")
    losses = fit(compiled, batches, loss_fn, steps=200, lr=1e-3)

Only `compiled.trainable_parameters()` are updated; gradients flow through the graph (fxforge
ops register their backward). It is an ordinary torch.optim loop, written out so examples and
tests share one; anything fancier is a plain PyTorch loop over the same parameters.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable

import torch

from fxforge.errors import FxforgeError


def fit(
    compiled: Any,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    *,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    progress: bool | None = None,
) -> list[float]:
    """Train `compiled`'s trainable parameters for `steps` steps; return the loss of each step.

    data: an iterable of batches, cycled if shorter than `steps`; each batch is `(inputs, target)`
        where `inputs` is a tensor, a tuple of positional inputs or an (args, kwargs) pair.
    loss_fn(output, target) -> scalar: output is what `compiled(*inputs)` returns.
    optimizer: "adamw" or "sgd". extra_loss: a regularizer added every step (e.g. SORSA's).
    progress: show a tqdm bar (default: unless FXFORGE_PROGRESS=0).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"fit: steps must be >= 1, got {steps}")
    params = list(compiled.trainable_parameters())
    if not params:
        raise FxforgeError("fit: the compiled model has no trainable parameters; add adapters (or heads) first, "
                           "e.g. passes='add_adapters(rank=8)'")
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"fit: optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if progress is None:
        progress = os.environ.get("FXFORGE_PROGRESS", "1") != "0"
    batches = itertools.cycle(data)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="fit", disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        try:
            inputs, target = next(batches)
        except StopIteration:
            raise FxforgeError("fit: `data` yielded no batches") from None
        args, kwargs = _split(inputs)
        loss = loss_fn(compiled(*args, **kwargs), target)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _split(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple) and isinstance(inputs[1], dict):
        return inputs
    if isinstance(inputs, dict):
        return (), inputs
    return tuple(inputs), {}
