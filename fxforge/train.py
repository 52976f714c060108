"""`fit`: a small training loop for compiled models (adapters, heads), with a progress bar.

    compiled = fxforge.compile(model, args, passes="add_adapters(rank=8)")
    losses = fit(compiled, batches, loss_fn, steps=200, lr=1e-3)

Only `compiled.trainable_parameters()` are updated; gradients flow through the graph (fxforge
ops register their backward). It is an ordinary torch.optim loop, written out so examples and
tests share one; anything fancier is a plain PyTorch loop over the same parameters.

Data-parallel training: run the same script under `torchrun --nproc-per-node N` after
`torch.distributed.init_process_group(...)` (gloo on CPU, nccl on GPUs). `fit` sees the process
group, wraps the graph in DistributedDataParallel (gradients averaged across ranks every step,
parameters broadcast from rank 0 at the start) and trains; every rank ends with the same
parameters. Each rank trains on its shard: either `data` is already this rank's batches
(a DistributedSampler's, say), or `split_batches=True` gives every rank the same global
batches and each takes its 1/N slice along dim 0 — with a mean loss and equal slices, N
processes compute exactly the single-process full-batch gradient.
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
    split_batches: bool = False,
) -> list[float]:
    """Train `compiled`'s trainable parameters for `steps` steps; return the loss of each step.

    data: an iterable of batches, cycled if shorter than `steps`; each batch is `(inputs, target)`
        where `inputs` is a tensor, a tuple of positional inputs or an (args, kwargs) pair.
    loss_fn(output, target) -> scalar: output is what `compiled(*inputs)` returns.
    optimizer: "adamw" or "sgd". extra_loss: a regularizer added every step (e.g. SORSA's).
    progress: show a tqdm bar (default: unless FXFORGE_PROGRESS=0; rank 0 only under torch.distributed).
    split_batches: under torch.distributed, every rank is given the same batches and trains on its
        slice (rank r of N takes rows [r·b/N, (r+1)·b/N) of every tensor whose first dimension is the
        batch size b, which N must divide); False: `data` is already this rank's shard.
        Returned losses are then the mean over ranks (every rank returns the same list).
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
    group = distributed_group()
    forward: Callable[..., Any] = compiled
    if group is not None:
        forward = data_parallel(compiled)
        progress = progress and torch.distributed.get_rank() == 0
    elif split_batches:
        raise FxforgeError("fit: split_batches=True splits batches across torch.distributed ranks, but no "
                           "process group is initialized; run under torchrun and call "
                           "torch.distributed.init_process_group() first, or drop split_batches")
    batches = itertools.cycle(data)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="fit", disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        try:
            inputs, target = next(batches)
        except StopIteration:
            raise FxforgeError("fit: `data` yielded no batches") from None
        if group is not None and split_batches:
            inputs, target = rank_slice((inputs, target))
        args, kwargs = _split(inputs)
        loss = loss_fn(forward(*args, **kwargs), target)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(_mean_over_ranks(loss.detach()) if group is not None else float(loss.detach()))
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


def distributed_group() -> Any:
    """The default torch.distributed process group when one is initialized (under torchrun), else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def data_parallel(compiled: Any) -> Callable[..., Any]:
    """compiled(*args, **kwargs), with the graph wrapped in DistributedDataParallel.

    DDP broadcasts rank 0's parameters when it is built (so every rank starts equal) and
    all-reduces the gradients of the trainable ones in backward. Inputs are checked and
    flattened as the compiled model does, then run through the wrapper.
    """
    from torch.nn.parallel import DistributedDataParallel

    from fxforge.ir.trace import unflatten_outputs

    if getattr(compiled, "backend", "eager") != "eager":
        raise FxforgeError(f"fit: training runs on the eager graph; this model's backend is "
                           f"'{compiled.backend}'. Compile with backend='eager' to train, export afterwards.")
    import inspect

    gm = compiled.graph_module
    # Graph buffers (quantized codes, masks) never change: synced once at the start, not every step
    # (torch 2.13 renamed the option; older versions know only broadcast_buffers).
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    ddp = DistributedDataParallel(gm, **{sync: False})

    def forward(*args: Any, **kwargs: Any) -> Any:
        flat = compiled._flat_inputs(args, kwargs)
        return unflatten_outputs(gm, ddp(*flat))

    return forward


def rank_slice(batch: Any) -> Any:
    """This rank's 1/N of every tensor in `batch` whose first dimension is the batch size."""
    import torch.utils._pytree as pytree

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tensors = [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0]
    if not tensors:
        raise FxforgeError("fit(split_batches=True): the batch holds no tensor to split")
    size = tensors[0].shape[0]
    if size % world:
        raise FxforgeError(f"fit(split_batches=True): batch size {size} is not divisible by the {world} ranks; "
                           f"use batches of a multiple of {world} rows (or shard the data yourself)")
    step = size // world

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == size:
            return leaf[rank * step:(rank + 1) * step]
        return leaf

    return pytree.tree_map(cut, batch)


def _mean_over_ranks(loss: torch.Tensor) -> float:
    # gloo has no AVG reduction: sum, then divide
    total = loss.float().reshape(1).clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return float(total) / torch.distributed.get_world_size()
