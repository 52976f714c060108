"""Pass `fuse_projections`: linears that read one input become one linear and a split.

    q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
        -> qkv = linear(x, cat(Wq, Wk, Wv)); q, k, v = split_with_sizes(qkv, [nq, nk, nv], -1)

q/k/v (GQA's narrower k/v included), gate/up and Medusa heads' first blocks each become one
matrix product: one weight stream and one kernel launch instead of three, which is what
decode on bandwidth-bound CPUs and GPUs pays for. Every linear kind of the IR fuses with its
own kind: plain, int-n weight-only (packed codes, scales and zeros concatenate), W8A8,
LLM.int8, FP8/FP4, shift-add, BitDelta, sparse (COO and `sparsify`'s masked weights), and the
adapters (LoRA/DoRA: A stacked, B block-diagonal; Bone, MiSS); `kinds.py` says how
each concatenates and why it stays exact. What stays apart, each reported in `skipped` with
its reason: members of different kinds or options (int-n group sizes or bits, FP formats,
BitDelta's one-α-per-matrix unless the α's are equal), factors computed in the graph (LoRA-SB,
SVFit, SORSA, LoLDU: nothing stored to concatenate), tensors read by other nodes too (tied
weights would be copied), and QLoRA bases (merge_adapters finds them by node name).

Biases: members without one contribute zeros to the fused bias, so q/k/v fuse in models that
bias only some projections; adding an exact 0 changes no output, and the cost is a few floats.

Exact: the default tolerance holds (every output row computes what its member computed).
The fused graph is meant for inference: training it afterwards would also train the zero
blocks of a fused LoRA B, which the unfused adapters do not have.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from fxforge.ir.graph import erase_dead
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.projections.groups import plan_groups
from fxforge.passes.projections.rewrite import fuse_group, fused_path


@register_pass
@dataclass(frozen=True)
class FuseProjections(Pass):
    """Fuse linears sharing an input into one linear per group, split after; see the module docstring.

    targets / exclude: module-path patterns (fnmatch, a bare name matches as a suffix) of the
        linears that may fuse; include_lm_head lets the LM head join a group (off: it is
        usually tied to the embedding, which would be copied).
    min_group: the fewest compatible linears worth fusing (2 or more).

    >>> Pipeline("quantize(bits=4),fuse_projections")
    """

    name = "fuse_projections"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    min_group: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.min_group, int) or self.min_group < 2:
            raise ValueError(f"fuse_projections: min_group={self.min_group!r} must be an integer >= 2 "
                             f"(a group of one has nothing to fuse)")
        for field_name in ("targets", "exclude"):  # a string from a pipeline spec is one pattern
            value = getattr(self, field_name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, field_name, (value,) if isinstance(value, str) else tuple(value))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        plan = plan_groups(gm, self.targets, self.exclude, self.include_lm_head, self.min_group)
        fused: dict[str, list[str]] = {}
        for members in plan.groups:
            fused[fused_path(members)] = [m.path for m in members]
            fuse_group(gm, members)
        erase_dead(gm)  # the members' tensors: held once, in the fused layer
        skipped = plan.skipped or ([] if plan.groups else [  # never a silent zero
            ("<graph>", f"no {self.min_group} linear layers of one kind read the same input (nothing to fuse; "
                        f"e.g. Q, K and V are one projection already)")])
        return PassResult(gm, sites=len(plan.groups), skipped=skipped, notes={"fused": fused})
