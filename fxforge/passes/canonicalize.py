"""Pass `canonicalize`: the IR's one canonical form (see fxforge/ir/canonicalize.py).

Run first by default by `fxforge.compile`; every other pass may assume its output.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from fxforge.ir.canonicalize import canonicalize
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """linear/Conv1D/mm/matmul-with-parameter -> aten.linear; eval dropout and asserts removed; DCE."""

    name = "canonicalize"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, sites=canonicalize(gm))
