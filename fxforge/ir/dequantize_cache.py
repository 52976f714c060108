"""Dequantized weights kept across the graph runs of one verification (`reuse_dequantized`).

The eager reference of a packed-weight op (`fxforge::linear_wq`, `linear_wq_ic`) unpacks and
dequantizes its weight on every call, which costs more than the matmul at a few tokens: an exact
pass's verification runs the same packed weights 2-6 times (graph before and after, at two
shapes; `add_kv_cache` a prefill and a cached step), so a quantized decoder's compile spent ~40%
of its time dequantizing the same tensors. Inside `reuse_dequantized()` each weight is
dequantized once and the float32 result reused, bit for bit the same as computing it again.

An entry is reused only for the very same tensors at the same in-place version counters
(identity checked through a weak reference, so a freed tensor whose id is recycled never
matches), and everything is dropped when the block exits. Memory is bounded by `budget_bytes`:
past it, weights are dequantized per call as without the cache.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor

# At most this many bytes of dequantized weights per block: a TinyLlama-shaped 4-layer model
# holds ~1 GiB of them in float32. Beyond it the remaining weights are recomputed per call.
DEFAULT_BUDGET_BYTES = 2 << 30


class _Cache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        # (id(first tensor), extra key) -> (weak refs and versions of every keyed tensor, result):
        # `extra` is part of the key so that the row slices of one large weight (`linear_wq`'s
        # `row_chunks`) are entries of their own
        self.entries: dict[tuple[int, tuple], tuple[tuple, Tensor]] = {}

    def lookup(self, tensors: tuple[Tensor, ...], extra: tuple, compute: Callable[[], Tensor]) -> Tensor:
        key = (id(tensors[0]), extra)
        entry = self.entries.get(key)
        if entry is not None:
            seen, result = entry
            if len(seen) == len(tensors) and all(
                    ref() is t and version == t._version for (ref, version), t in zip(seen, tensors)):
                self.hits += 1
                return result
        self.misses += 1
        result = compute()
        size = result.numel() * result.element_size()
        if entry is not None:  # a stale entry for this key: replaced (or dropped if it cannot be)
            self.used -= entry[1].numel() * entry[1].element_size()
            del self.entries[key]
        if self.used + size <= self.budget:
            self.entries[key] = (tuple((weakref.ref(t), t._version) for t in tensors), result)
            self.used += size
        return result


_ACTIVE: list[_Cache] = []


@contextmanager
def reuse_dequantized(budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Iterator[_Cache]:
    """Within this block, packed-weight ops dequantize each weight once (see the module docstring).

    Nested blocks share the outermost cache. Yields it (`hits`, `misses`, `used` bytes).
    """
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    cache = _Cache(budget_bytes)
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)
        cache.entries.clear()


def caching(tensors: tuple[Tensor, ...]) -> bool:
    """Whether `dequantized` would keep its result for these tensors (then it must be a buffer of
    its own, not a reused `fxforge.ir.scratch` one)."""
    return bool(_ACTIVE) and not any(t.requires_grad for t in tensors)


def dequantized(tensors: tuple[Tensor, ...], extra: tuple, compute: Callable[[], Tensor]) -> Tensor:
    """`compute()`, or its earlier result for the same `tensors` (unchanged) and `extra` inside a
    `reuse_dequantized` block. The result must be treated as read-only by the caller."""
    if not caching(tensors):  # trained scales (requires_grad): no stale graphs
        return compute()
    return _ACTIVE[-1].lookup(tensors, extra, compute)


__all__ = ["reuse_dequantized", "dequantized", "caching", "DEFAULT_BUDGET_BYTES"]
