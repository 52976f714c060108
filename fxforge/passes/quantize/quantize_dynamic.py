"""Pass `quantize_dynamic`: W8A8 int8 with per-token dynamic activation scales.

    aten.linear(x, W, b) -> fxforge.linear_w8a8(x, W8, s_w, b)
    s_w[n] = max|W[n, :]| / 127,  W8 = clamp(round(W / s_w), -127, 127)   (per output channel)

Activations are quantized per token when the op runs (see fxforge/ir/ops/linear_w8a8.py);
ONNX lowers it to MatMulInteger, Triton to the int8 tl.dot GEMM.

Semantics (verified exactly): the graph before with each rewritten linear computing
fxforge::linear_w8a8's reference on the int8 codes and scales chosen here, i.e. activations
quantized per token at run time times Ŵ = W8·s_w. Modelling the run-time activation rounding
matters: a reference with float activations would differ by the activation loss, and one that
rounds differently would flip roundings downstream; this one agrees bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, add_attr, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassContext, PassResult, register_pass
from fxforge.passes.quantize.common import bias_node, select_sites, weight_of

INT8_MAX = 127


def int8_weight_attrs(gm: GraphModule, site: LinearSite, semantics: Semantics | None = None,
                      claim: "type[Int8Claim] | None" = None, *extra: object) -> tuple[Node, Node]:
    """Store `site`'s weight as int8 codes + per-row scales (buffers); their get_attr nodes.

    With `semantics`, records `claim(codes, scales, *extra)` as what the site computes."""
    codes, scale = quantize_weight_int8(weight_of(gm, site))
    if semantics is not None and claim is not None:
        semantics.replace_linear(site.weight_name, claim(codes, scale, *extra))
    qweight = add_attr(gm, f"{site.module_path}.qweight", codes, buffer=True, before=site.node)
    wscale = add_attr(gm, f"{site.module_path}.wscale", scale, buffer=True, before=site.node)
    return qweight, wscale


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (W8 int8 (N, K), scales float32 (N,)); an all-zero row gets scale 1."""
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


class Int8Claim:
    """fn(x, bias) = fxforge::<op>'s reference on the codes and scales the pass chose for a layer.

    Keyed by the layer's weight name in the graph before, so the graph's wiring (which buffers,
    which input, which bias reach the op) is what verification tests."""

    op_name = "linear_w8a8"

    def __init__(self, codes: Tensor, scale: Tensor, *extra: object):
        self.codes, self.scale, self.extra = codes, scale, extra

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return get_op(self.op_name).reference(x, self.codes, self.scale, bias, *self.extra)


@register_pass
@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """W8A8: int8 weights per channel, int8 activations per token, int32 accumulation."""

    name = "quantize_dynamic"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        op = get_op("linear_w8a8").overload
        selection = select_sites(gm, self.name, self.targets, self.exclude, self.include_lm_head)
        sites = selection.sites
        semantics = Semantics()
        for site in sites:
            attrs = int8_weight_attrs(gm, site, semantics, Int8Claim)
            replace_with_call(gm, site.node, op, (site.input, *attrs, bias_node(site)))
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, semantics=semantics)
