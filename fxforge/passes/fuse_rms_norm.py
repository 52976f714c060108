"""Pass `fuse_rms_norm`: the RMSNorm spelling Llama-family models export -> fxforge::rms_norm.

    w * (x32 * rsqrt(mean(x32², -1, keepdim) + eps)).to(x.dtype)   with x32 = x.to(float32)
        -> fxforge.rms_norm(x, w, eps)

Written as one pattern / rewrite row on `fxforge.ir.match`, rooted at the weight multiply.
Exact: the op's reference computes the same float32 expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from fxforge.ir.match import Attr, Capture, Casts, Match, Op, Rule, apply_rules, replace_root, strip_casts
from fxforge.ir.ops import get_op
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass

aten = torch.ops.aten

# ---- pattern: w * (x32 * rsqrt(mean(x32 ** 2, [-1], keepdim=True) + eps)).to(...), either
# operand order in both multiplies; x32 is one node (x, or x behind casts) read twice.
_X32 = Capture("x32")
_MEAN_SQUARE = Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, _X32, 2), [-1], True)
# rsqrt, the normalizing multiply and the casts after it must be private to the norm, so
# replacing the final multiply leaves nothing half-used behind.
_RSQRT = Op(aten.rsqrt.default, Op(aten.add.Tensor, _MEAN_SQUARE, Capture("eps", float)), single_use=True)
_NORMED = Op(aten.mul.Tensor, _X32, _RSQRT, commutative=True, single_use=True)
PATTERN = Op(aten.mul.Tensor, Attr("weight"), Casts(_NORMED), commutative=True)


# ---- rewrite: one op on the input before its float32 cast (the op casts itself).
def _rewrite(gm: GraphModule, found: Match) -> None:
    x = strip_casts(found["x32"])
    replace_root(gm, found, get_op("rms_norm").overload, (x, found["weight"], float(found["eps"])))


RULE = Rule("rms_norm", PATTERN, _rewrite)  # no check: every match is exact


@register_pass
@dataclass(frozen=True)
class FuseRmsNorm(Pass):
    """Replace each RMSNorm subgraph by one fxforge::rms_norm op."""

    name = "fuse_rms_norm"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        sites = apply_rules(gm, [RULE]).rewrites
        skipped = [] if sites else [("<graph>", "no x·rsqrt(mean(x²)+eps)·weight subgraph: the model normalizes "
                                                "another way (e.g. aten.layer_norm) or it is fused already")]
        return PassResult(gm, sites=sites, skipped=skipped)
