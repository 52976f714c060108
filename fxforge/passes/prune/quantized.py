"""Sparsity on a quantized layer (`quantize` then `sparsify`): mask the integer codes.

`fxforge::linear_wq` computes ŵ = (q - z)·s per group, with integer zero points z, so setting a
pruned weight's code to its group's zero point makes it exactly 0 while every kept weight keeps
its code: the result is the quantized layer with the mask applied, still one linear_wq (same
kernels, same ONNX MatMulNBits). The claim verified is F.linear(x, ŵ·mask, b).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, get_attr, set_attr
from fxforge.ir.ops.linear_wq import dequantize_wq, pack_bits, unpack_bits
from fxforge.ir.reference import Semantics
from fxforge.passes.selection import LayerSelection

LINEAR_WQ = torch.ops.fxforge.linear_wq.default


def quantized_sites(gm: GraphModule, selection: LayerSelection, include_lm_head: bool) -> list[LinearSite]:
    """The linear_wq layers `selection` chooses (weight = the packed codes), LM head opt-in."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != LINEAR_WQ or not isinstance(node.args[1], Node):
            continue
        path = str(node.meta.get("module_path") or node.args[1].target.rsplit(".", 1)[0])
        if not selection.chooses(path) or (not include_lm_head and path.rsplit(".", 1)[-1] == "lm_head"):
            continue
        bias = node.args[4]
        sites.append(LinearSite(node=node, weight_name=node.args[1].target,
                                bias_name=bias.target if isinstance(bias, Node) else None,
                                in_features=int(node.args[0].meta["val"].shape[-1]),
                                out_features=int(node.meta["val"].shape[-1]), module_path=path))
    return sites


def mask_codes(gm: GraphModule, site: LinearSite, choose_mask: Callable[[Tensor], Tensor],
               semantics: Semantics) -> int:
    """Zero the weights `choose_mask(ŵ)` drops (False = pruned) by setting their codes to the zero
    point; records the claim in `semantics`; returns how many weights were zeroed."""
    _, qweight, scales, zeros, _, bits, group_size = site.node.args
    k = site.in_features
    packed, z = get_attr(gm, qweight.target), get_attr(gm, zeros.target)
    weight = dequantize_wq(packed, get_attr(gm, scales.target), z, bits, group_size, k)
    mask = choose_mask(weight)
    codes = unpack_bits(packed, bits, k)
    zero_codes = z.repeat_interleave(group_size, dim=1)[:, :k].to(codes.dtype)
    set_attr(gm, qweight.target, pack_bits(torch.where(mask, codes, zero_codes), bits))
    claimed = weight.masked_fill(~mask, 0)  # from the dequantized weights and the mask, not the codes

    def masked_linear(x: Tensor, bias: Tensor | None, w: Tensor = claimed) -> Tensor:
        b = None if bias is None else bias.to(torch.float32)
        return F.linear(x.to(torch.float32), w, b).to(x.dtype)

    semantics.replace_linear(qweight.target, masked_linear)
    return int((~mask).sum())
