"""Streamed graphs: weights read from mapped files block by block, results written block by block.

A graph traced from a model whose weights are views of memory-mapped safetensors files
(`hf.from_pretrained(..., lazy=True)`, `fxforge.models.lazy_weights`) is *streamed*: `trace`
gives it a `SpillStore` in `gm.meta[STREAMED]`. Passes that walk the graph block by block call
`settle(gm, nodes)` when they are done with a block (the calibration engine after advancing a
segment, `rewrite_by_block` for data-free rewrites such as RTN quantization):

1. the tensors the block reads that this process owns (a rewrite's new int4 codes, scales) are
   written to the spill directory and replaced in the graph by views of what was written;
2. the file pages of every mapping are given back (madvise), source and spill: those of the
   weights the block's rewrite read and replaced too, which the graph no longer names;
3. the C heap's free memory goes back to the system (`release_free_heap`), else freed
   temporaries of each block stay resident and peak RSS grows with the number of blocks.

So a streamed pass holds one block's weights and results at a time, and what it produced is
already on disk for the next step (the ONNX backend writes external data tensor by tensor from
those views). On a graph that is not streamed both functions do nothing.

`SpillStore.peak_owned_bytes` is the high-water mark of owned tensor bytes in the graph seen at
the settle points (right after each block's rewrite, the most a block holds): the counter tests
bound, since RSS also counts the page cache and the runtime.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch.fx import GraphModule, Node

from fxforge.models.lazy_weights import SpillStore, drop_all_pages, drop_pages, is_mapped, mapped_bytes

__all__ = ["STREAMED", "streamed", "mark_streamed", "settle", "spill", "rewrite_by_block", "owned_bytes"]

# Not "fxforge_"-prefixed: process-local (a temporary directory), never saved with an artifact.
STREAMED = "streamed_spill"
# Owned tensors smaller than this stay in memory (norm weights, rotary tables): one file each
# would cost more than it saves.
SPILL_MIN_BYTES = 64 * 2**10


def streamed(gm: GraphModule) -> SpillStore | None:
    """The graph's spill store when its weights are streamed, else None."""
    store = gm.meta.get(STREAMED)
    return store if isinstance(store, SpillStore) else None


def mark_streamed(gm: GraphModule) -> bool:
    """Make `gm` streamed if any of its tensors is file-mapped (called by `trace`); whether it is."""
    if streamed(gm) is None and any(is_mapped(t) for t in _tensors(gm)):
        gm.meta[STREAMED] = SpillStore()
    return streamed(gm) is not None


def _tensors(gm: GraphModule) -> Iterable[torch.Tensor]:
    yield from gm.parameters()
    yield from (b for b in gm.buffers() if isinstance(b, torch.Tensor))


def owned_bytes(gm: GraphModule) -> int:
    """Bytes of the graph's tensors this process owns (not views of mapped files)."""
    return mapped_bytes(_tensors(gm))[1]


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _set(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    module = gm.get_submodule(".".join(path)) if path else gm
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad
                                                                                 and value.is_floating_point()))
    else:
        module._buffers[leaf] = value


def settle(gm: GraphModule, nodes: Iterable[Node]) -> None:
    """Spill the owned tensors `nodes` read and give back every page they read (module doc)."""
    store = streamed(gm)
    if store is None:
        return
    targets = sorted({arg.target for node in nodes for arg in node.all_input_nodes if arg.op == "get_attr"})
    store.peak_owned_bytes = max(store.peak_owned_bytes, owned_bytes(gm))
    tensors = {t: _attr(gm, t) for t in targets}
    owned = {t: v.detach() for t, v in tensors.items()
             if isinstance(v, torch.Tensor) and not is_mapped(v) and v.numel() * v.element_size() >= SPILL_MIN_BYTES}
    for target, view in store.spill(owned).items():
        _set(gm, target, view)
        tensors[target] = view
    del owned
    drop_all_pages()  # also the pages of weights the rewrite read and replaced (no longer in the graph)
    release_free_heap()


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc `malloc_trim`; elsewhere nothing).

    A block's temporaries (GPTQ's working matrix, Gram matrices, activations) are freed, but glibc
    keeps freed heap memory for reuse and cannot return it while a live allocation sits above it:
    streamed int4 runs grew RSS with every block (7B-shaped GPTQ: 2.74 → 3.39 GiB from 2 to 8
    blocks; TinyLlama-shaped RTN: RssAnon +45 MiB a block with no owned tensor of 1 MiB or more
    alive), and trimming at each settle keeps it flat (+3 MiB a block). Python's standard
    library has no call for this, hence ctypes; it takes milliseconds.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim
    except OSError:
        return None


def spill(gm: GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` written to the graph's spill directory and read back as views (streamed graphs;
    others get `tensors` back): for what a pass keeps outside the graph, e.g. quantize's claims."""
    store = streamed(gm)
    if store is None:
        return tensors
    views = store.spill(tensors)
    drop_pages(views.values())
    return views


def rewrite_by_block(gm: GraphModule, nodes: list[Node], rewrite: Callable[[list[Node], str], None]) -> None:
    """Call `rewrite(nodes of one block, block name)` block by block, settling each block after.

    For passes without calibration data (RTN quantization): on a streamed graph each block's
    weights are read, rewritten and written out before the next block's are read. On other
    graphs it is one call with every node (nothing to gain from cutting).
    """
    if streamed(gm) is None or not nodes:
        rewrite(list(nodes), "")
        return
    from fxforge.calibration.blocks import split_blocks

    plan = split_blocks(gm)
    where = plan.segment_of()
    by_segment: dict[int, list[Node]] = defaultdict(list)
    for node in nodes:
        by_segment[where.get(node, len(plan.segments))].append(node)
    for segment in plan.segments:
        mine = by_segment.pop(segment.index, None)
        if mine:
            rewrite(mine, segment.name)
            plan.refresh(segment)
            settle(gm, segment.nodes)
    for rest in by_segment.values():  # nodes in no segment: none in a canonical graph
        rewrite(rest, "")
