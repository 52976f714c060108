"""Reusable buffers for weights an op builds, uses once and drops, within one graph run.

Why: the eager reference of a packed-weight op (`fxforge::linear_wq`) dequantizes its weight
into a fresh float32 buffer on every call, and the first write to fresh memory is a page fault
per 4 KiB: dequantizing a 5632 x 2048 int4 weight took 48 ms on one core, 23 ms into a buffer
written before (`bench/compile_phases.py`: verification and the decoder check dequantize every
weight of a model several times). Inside `scratch_buffers()` (entered by the verification runs,
`fxforge.ir.verify.run_graph` / `fxforge.ir.lockstep.run_graph_many`) such an op takes its
buffer from `scratch(...)`, which hands back the same memory call after call; outside, `scratch`
allocates as before, so nothing is held between runs.

A scratch buffer is valid until the next `scratch` call with the same `slot`: only for a weight
that is consumed (multiplied) before the op asks again, never for one that is kept or returned.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor


class _Pools(threading.local):
    """Per thread: a graph run in a worker thread (the decoder check's reference) and one in the
    main thread never hand out the same buffer."""

    def __init__(self) -> None:
        self.stack: list[dict[tuple[str, torch.dtype, torch.device], Tensor]] = []


_POOLS = _Pools()


@contextmanager
def scratch_buffers() -> Iterator[None]:
    """Within this block `scratch` reuses its buffers (one per slot, dtype and device). Nested
    blocks share the outermost pool; the buffers are freed when it exits."""
    pools = _POOLS.stack
    if pools:
        yield
        return
    pool: dict = {}
    pools.append(pool)
    try:
        yield
    finally:
        pools.remove(pool)
        pool.clear()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """An uninitialized tensor of `shape`: the pool's buffer for `slot` (grown when too small)
    inside `scratch_buffers()`, a new one outside."""
    device = torch.device(device)
    pools = _POOLS.stack
    if not pools:
        return torch.empty(shape, dtype=dtype, device=device)
    pool, key = pools[-1], (slot, dtype, device)
    numel = 1
    for size in shape:
        numel *= size
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        pool.pop(key, None)  # the old one goes before the larger one is allocated
        buffer = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


__all__ = ["scratch", "scratch_buffers"]
