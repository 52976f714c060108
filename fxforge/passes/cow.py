"""Copy-on-write graphs: what a pass gets to rewrite, and how old graphs are let go.

A pass runs on `structural_copy(gm)`: a new Graph and GraphModule (nodes, metadata and
submodules copied) whose parameters and buffers are new tensor objects over the *same storage*
as `gm`'s. Copying the structure costs kilobytes; copying the weights would cost a whole model
per pass. The contract that makes this safe: a pass replaces a tensor (`set_attr`, `add_attr`)
and never writes one in place. `SharedTensorGuard` checks that contract on every pass through
the tensors' version counters (every in-place op bumps them; they are shared between a tensor
and its `detach()`ed views), so a pass that breaks it fails loudly instead of corrupting the
graph before it, or the user's model, whose tensors tracing shares too (`ir/trace.py`).
Rolling a pass back is dropping its copy.

`release(gm)` breaks the GraphModule ↔ Graph reference cycle of a graph nobody will use again,
so its tensors are freed as soon as its last reference goes instead of at the next cyclic
garbage collection (which, for a billion-parameter model, means a whole extra model in memory).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.fx import GraphModule

from fxforge.errors import PassError


def _tensors(gm: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from gm.named_parameters(remove_duplicate=False)
    yield from ((name, t) for name, t in gm.named_buffers(remove_duplicate=False) if isinstance(t, torch.Tensor))


def _share(t: torch.Tensor) -> torch.Tensor:
    """A new tensor object over `t`'s storage and version counter (flags the copy's own)."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach(), requires_grad=t.requires_grad)
    return t.detach()


def structural_copy(gm: GraphModule) -> GraphModule:
    """`gm` with its graph, metadata and module tree copied and its tensors shared.

    The shared tensors are new objects (`detach()`), so a pass may flip `requires_grad` or
    rebind `.data` on its copy without the graph before seeing it; only in-place writes into
    the data would, and `SharedTensorGuard` reports those.
    """
    memo: dict[int, object] = {}
    for _, t in _tensors(gm):
        if id(t) not in memo:
            memo[id(t)] = _share(t)
    return copy.deepcopy(gm, memo)


def storages(gm: nn.Module) -> dict[int, int]:
    """Storage address -> bytes of every parameter and buffer of `gm` (aliases counted once)."""
    found: dict[int, int] = {}
    for _, t in _tensors(gm):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def new_tensor_bytes(before: nn.Module, after: nn.Module) -> int:
    """Bytes of `after`'s tensors that are not shared with `before`: what a pass allocated."""
    old = storages(before)
    return sum(n for ptr, n in storages(after).items() if ptr not in old)


@dataclass
class SharedTensorGuard:
    """Version counters of a graph's tensors, taken before a pass runs on its structural copy."""

    versions: dict[str, tuple[torch.Tensor, int]]

    @classmethod
    def of(cls, gm: GraphModule) -> "SharedTensorGuard":
        return cls({name: (t, t._version) for name, t in _tensors(gm)})

    def check(self, pass_spec: str, pass_name: str) -> None:
        """PassError naming the tensors the pass wrote in place (the graph before changed)."""
        written = [name for name, (t, version) in self.versions.items() if t._version != version]
        if written:
            shown = ", ".join(written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
            raise PassError(
                f"pass '{pass_spec}' wrote in place into {shown}, which it shares with the graph before "
                "it (and possibly the user's model). This is a bug in the pass: build the new tensor "
                "(e.g. w * s, not w.mul_(s)) and install it with fxforge.ir.graph.set_attr",
                pass_name=pass_name)


def release(gm: GraphModule) -> None:
    """Break `gm`'s GraphModule ↔ Graph cycle: call only on a graph no one will run again.

    Its tensors are then freed by reference counting the moment its last reference goes.
    """
    graph = gm.__dict__.get("_graph")
    if graph is not None and graph.owning_module is gm:  # a graph handed on to a newer module stays its
        graph.owning_module = None


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (0 where `resource` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
