"""Ops outside attention whose output for one token depends on other tokens: a KV cache cannot hold.

A KV cache rests on one property: every op outside attention computes each token from that token
alone, so running the prompt once and then one token at a time gives the same result. W8A8 with a
per-tensor activation scale (`quantize_dynamic(act_scale="tensor")`) breaks it: one scale for the
whole input means the other tokens' range (and, in a batch, other sequences' padding) sets every
token's rounding, so a 1-token step quantizes differently from the same token inside its prompt.
That is not reordering that a tolerance could cover: on a 4-layer TinyLlama-shaped model the
cached logits differed by 8% (relative L2). So add_kv_cache refuses such graphs up front, naming
the per-token scale (exact under caching, and more accurate) as the way out.

Per token, the cache is exact up to the float reordering of attention, as for any graph; but
rounding activations turns a 1e-7 reordering into a whole quantization step wherever a value sits
on a rounding boundary (measured: 1% relative L2 on the 4-layer model). So verification checks
add_kv_cache's claim with activations unrounded (`fxforge.ir.activation_rounding.unrounded`):
every weight and wire is still checked, only the rounding's discontinuity is left out, and the
per-tensor case, whose difference is real, is refused here before any check.
"""
from __future__ import annotations

from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import nodes_by_op
from fxforge.ir.ops import get_op

_ACT_SCALE_ARG = 4  # linear_w8a8(x, qweight, wscale, bias, act_scale="tensor")


def refuse_token_mixing(gm: GraphModule, pass_name: str) -> None:
    """PassError if a linear_w8a8 in gm quantizes its activations with one scale per tensor."""
    per_tensor = []
    for node in nodes_by_op(gm, get_op("linear_w8a8").overload):
        mode = node.args[_ACT_SCALE_ARG] if len(node.args) > _ACT_SCALE_ARG else node.kwargs.get("act_scale", "tensor")
        if mode == "tensor":
            per_tensor.append(node.name)
    if per_tensor:
        raise PassError(
            f"pass '{pass_name}' cannot cache this graph: {len(per_tensor)} W8A8 linear(s) (first: {per_tensor[0]}) "
            "quantize activations with one scale per tensor, so each token's result depends on the other "
            "tokens and a cached 1-token step would not compute what the full sequence does. Quantize with "
            "quantize_dynamic(act_scale=\"token\") (one scale per token: exact under caching, and more accurate).",
            pass_name=pass_name)
