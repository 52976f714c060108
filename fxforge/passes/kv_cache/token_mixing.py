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

from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxforge.errors import PassError
from fxforge.ir.graph import nodes_by_op
from fxforge.ir.ops import get_op

aten = torch.ops.aten
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


# --------------------------------------------------------------------------- sequence mixers
#
# The same property fails, for real, in layers that mix tokens outside softmax attention: a
# short causal convolution over the sequence (Mamba's conv1d, ZAYA's and Inkling's conv on the
# keys), a cumulative scan (state-space models), a matmul contracting over the tokens (linear /
# lightning attention). A cached step sees only its new tokens, so each of these would restart
# from nothing; caching them needs their recurrent state (conv window, SSM state) carried
# between calls, which a KV cache does not hold. They are refused by name instead of failing
# verification with a numeric difference.

_CONVOLUTIONS = {aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding,
                 aten.convolution.default}
_SCANS = {aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default}
_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default}


def _symbols(size: Any) -> set:
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


class _SequenceAxis:
    """Tells whether a (symbolic) size counts the tokens of the current call: it involves the
    traced length L but neither the batch (a dispatch over B·L tokens keeps them apart) nor the
    past length (the cached attention's keys: P + L)."""

    def __init__(self, ids: Node, past_len: Any = None):
        shape = ids.meta["val"].shape
        self.length = _symbols(shape[1])
        self.other = _symbols(shape[0]) | _symbols(past_len)

    def counts_tokens(self, size: Any) -> bool:
        found = _symbols(size)
        return bool(self.length) and self.length <= found and not (found & self.other)


def _refuse(node: Node, construct: str, pass_name: str) -> None:
    where = node.meta.get("module_path") or node.name
    raise PassError(
        f"pass '{pass_name}' cannot cache this graph: {construct} at '{where}' (node {node.name}) mixes "
        "tokens outside attention, so a cached step over the new tokens alone would not compute what the "
        "full sequence does; it needs a recurrent state (conv window / scan state) carried between calls, "
        "which a KV cache does not hold. Models with such layers (state-space, linear-attention, "
        "short-convolution mixers) are not supported by add_kv_cache.", pass_name=pass_name, node=node.name)


def refuse_sequence_convolutions(gm: GraphModule, ids: Node, pass_name: str) -> None:
    """PassError at the first convolution whose spatial axis is the token sequence.

    Run on the graph as traced, before any attention is rewired: a convolution is never part of
    the attention or mask subgraphs that the cache replaces."""
    axis = _SequenceAxis(ids)
    for node in gm.graph.nodes:
        val = _val(node.args[0]) if node.op == "call_function" and node.target in _CONVOLUTIONS else None
        if val is not None and any(axis.counts_tokens(size) for size in val.shape[2:]):
            _refuse(node, "a convolution over the sequence", pass_name)


def refuse_sequence_mixing(gm: GraphModule, ids: Node, past_len: Any, pass_name: str) -> None:
    """PassError at the first scan or matmul over the tokens of the call in the cached graph.

    Run on the cached graph (shape metadata refreshed): the attention there contracts over the
    past and new keys (P + L) and position counts were rewired, so a contraction or scan over
    L alone is a sequence mixer that the cache cannot serve."""
    axis = _SequenceAxis(ids, past_len)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SCANS:
            val = _val(node.args[0])
            if val is not None and val.dim() and axis.counts_tokens(val.shape[node.args[1]]):
                _refuse(node, "a cumulative scan over the sequence", pass_name)
        elif node.target in _PRODUCTS:
            val = _val(node.args[0])
            if val is not None and val.dim() and axis.counts_tokens(val.shape[-1]):
                _refuse(node, "a matmul contracting over the sequence (linear attention or a state-space chunk)",
                        pass_name)
