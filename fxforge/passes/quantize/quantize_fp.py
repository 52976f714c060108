"""Pass `quantize_fp`: weights in FP8 (E4M3, E5M2) or FP4 (E2M1) with per-channel or per-group
scales, optional FP8 dynamic activations, and LLM-FP4's scale search with calibration data.

    aten.linear(x, W, b) -> fxforge.linear_fp(x, codes, scales, b, fmt, group_size, act_fmt)

Scales map each channel's (group's) absmax to the format's max (E4M3 448, E5M2 57344, E2M1 6).
With calibration data (and `search`), LLM-FP4's exponent-bias search runs per output channel:
the channel's max is taken from b0·linspace(0.01, 1.2, search_points), b0 = its absmax, and the
candidate with the lowest layer-output L2 error on calibration rows wins (a different maximum
is the same as a different exponent bias for these formats).

Semantics (verified exactly): the graph before with each rewritten linear's weight replaced by
decode(codes)·scale from the unpacked codes; with `act_fmt`, that linear also rounds its input
per token to FP8 at run time, as the op does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxforge.errors import PassError
from fxforge.ir.graph import add_attr, replace_with_call
from fxforge.ir.ops import get_op
import torch.nn.functional as F

from fxforge.ir.ops.linear_fp import FORMAT_MAX, FP8_DTYPES, decode, encode, round_activations
from fxforge.ir.ops.linear_wq import pack_bits
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.calibration.engine import calibrate
from fxforge.passes.quantize.common import bias_node, check_option, resolve_group_size, weight_of
from fxforge.passes.selection import LayerSelection

SEARCH_ROWS = 128  # calibration rows for the scale search (cost grows with rows x points)


def fake_quantize_fp(groups: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """ŵ of weight groups (…, g) under per-group scales (…, 1)."""
    return decode(encode(groups / scale, fmt), fmt) * scale


def search_channel_scales(weight: Tensor, group_size: int, fmt: str, x: Tensor, points: int) -> Tensor:
    """LLM-FP4 search: per output row, the max ratio in linspace(0.01, 1.2, points) of lowest output error."""
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    absmax = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    best_err = torch.full((n,), float("inf"))
    best_ratio = torch.ones(n)
    for ratio in torch.linspace(0.01, 1.2, points):
        delta = (fake_quantize_fp(groups, absmax * ratio / FORMAT_MAX[fmt], fmt) - groups).reshape(n, k)
        err = (x @ delta.T).pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return absmax * best_ratio[:, None, None] / FORMAT_MAX[fmt]


class FpActivationClaim:
    """fn(x, bias): x rounded per token to `act_fmt`, times the claimed weight ŵ, in float32."""

    def __init__(self, weight: Tensor, act_fmt: str):
        self.weight, self.act_fmt = weight, act_fmt

    def __call__(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x32 = round_activations(x.to(torch.float32), self.act_fmt)
        return F.linear(x32, self.weight, None if bias is None else bias.to(torch.float32)).to(x.dtype)


@register_pass
@dataclass(frozen=True)
class QuantizeFp(Pass):
    """FP8/FP4 weights (and optionally FP8 activations); see the module docstring."""

    name = "quantize_fp"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    produces = "linear_fp"
    fmt: str = "e4m3"                  # e4m3 | e5m2 | e2m1
    group_size: int = -1               # -1: one scale per output channel
    act_fmt: str = ""                  # "" (float) | e4m3 | e5m2: per-token dynamic FP8 activations
    search: bool = True                # LLM-FP4 scale search when calibration data is given
    search_points: int = 101
    calibration_batches: int = 32
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        check_option(self.fmt in FORMAT_MAX, f"quantize_fp: fmt={self.fmt!r} must be one of {tuple(FORMAT_MAX)}")
        check_option(self.act_fmt in ("",) + tuple(FP8_DTYPES),
                     f"quantize_fp: act_fmt={self.act_fmt!r} must be '' or one of {tuple(FP8_DTYPES)}")
        check_option(self.group_size == -1 or self.group_size > 0,
                     f"quantize_fp: group_size={self.group_size} must be positive or -1 (per channel)")
        check_option(self.search_points >= 2, "quantize_fp: search_points must be at least 2")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        op = get_op("linear_fp").overload
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        groups = {s.node.name: resolve_group_size(self.name, s, self.group_size, "in") for s in sites}
        for s in sites:
            if self.fmt == "e2m1" and s.in_features % 2:
                raise PassError(f"pass '{self.name}': layer '{s.module_path}' has {s.in_features} inputs; FP4 codes "
                                f"pack two a byte, so use fmt='e4m3' or exclude=['{s.module_path}']. The model was "
                                f"not changed.", pass_name=self.name)
        searching = self.search and ctx.calibration is not None and bool(sites)
        semantics = Semantics()
        if searching:  # given calibration must be usable; search=False is how to go without it
            # block by block: each block's search sees the outputs of the blocks already in FP
            by_node = {s.node: s for s in sites}
            calibrate(gm, ctx, {s.node: ("samples",) for s in sites},
                      lambda block: self._rewrite(gm, [by_node[n] for n in block.nodes], groups, op, semantics,
                                                  block.statistics, ctx, block.name),
                      pass_name=self.name, max_batches=self.calibration_batches, sample_rows=SEARCH_ROWS)
        else:
            self._rewrite(gm, sites, groups, op, semantics, {}, ctx, "")
        return PassResult(gm, sites=len(sites), skipped=selection.skipped,
                          notes={"fmt": self.fmt, "searched": searching}, semantics=semantics)

    def _rewrite(self, gm: GraphModule, sites: list, groups: dict, op, semantics: Semantics, stats: dict,
                 ctx: PassContext, where: str) -> None:
        """Quantize `sites` (one block when searching) in place; `stats` holds their input samples."""
        for site in ctx.progress(sites, desc="quantize_fp" + (f" {where}" if where else ""), total=len(sites)):
            w = weight_of(gm, site).float()
            g = groups[site.node.name]
            n, k = w.shape
            grouped = w.reshape(n, k // g, g)
            if site.node.name in stats:
                scale = search_channel_scales(w, g, self.fmt, stats[site.node.name].sample()[:SEARCH_ROWS],
                                              self.search_points)
            else:
                scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FORMAT_MAX[self.fmt]
            codes = encode(grouped / scale, self.fmt).reshape(n, k)
            claimed = (decode(codes, self.fmt).reshape(n, k // g, g) * scale.to(w.dtype).float()).reshape(n, k)
            if self.act_fmt:
                semantics.replace_linear(site.weight_name, FpActivationClaim(claimed, self.act_fmt))
            else:
                semantics.replace_weight(site.weight_name, claimed)
            if self.fmt == "e2m1":
                codes = pack_bits(codes, 4)
            codes_node = add_attr(gm, f"{site.module_path}.fp_codes", codes, buffer=True, before=site.node)
            scales_node = add_attr(gm, f"{site.module_path}.fp_scales", scale.squeeze(-1).to(w.dtype), buffer=True,
                                   before=site.node)
            replace_with_call(gm, site.node, op, (site.input, codes_node, scales_node, bias_node(site), self.fmt, g,
                                                  self.act_fmt))
