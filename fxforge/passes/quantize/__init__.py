"""Pass `quantize`: weight-only integer quantization of linear layers (bits 2-8).

    aten.linear(x, W, b) -> fxforge.linear_wq(x, qweight, scales, zeros, b, bits, group_size)
                            (group_axis="in": groups of input channels; MatMulNBits on ONNX)
                         -> fxforge.linear_wq_ic(x, qweightᵀ, scales, zeros, b, bits, group_size)
                            (group_axis="out": per-IC groups along the output dimension)

`method` picks how codes are chosen (TECHNIQUES.md, Quantization): `rtn` (round to nearest),
`awq` (calibration: activation-aware scales folded into the producer, then clip search),
`gptq` (calibration: Hessian-based error feedback), `easyquant` (data-free: outliers kept in
float as a sparse add, ranges optimized by gradient descent). Codes of 3 bits are stored in
4-bit containers, 5-7 bits in 8-bit ones. Symmetric quantization uses the fixed zero point
2^(bits-1), so both variants share one storage format. The sibling passes (`llm_int8`,
`quantize_fp`, `quantize_dynamic`, `bitdelta`) live next to this file.

Semantics (what verification holds the result to, exactly): the graph before with each
rewritten linear's weight replaced by the dequantized weight the method chose, ŵ = (q - z)·s
from the unpacked codes (plus EasyQuant's float outliers), and for AWQ the producers it
rescaled by 1/s. The loss against the float graph is measured and reported, not bounded.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass

from torch.fx import GraphModule

from fxforge.ir.graph import LinearSite, aten
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.quantize.calibration import capture_linear_inputs, require_batches
from fxforge.passes.quantize.common import (
    GROUP_AXES, check_option, check_packable, emit_weight_only, orient, resolve_group_size, select_sites,
    weight_of,
)
from fxforge.passes.quantize.rtn import QuantSpec, quantize_weight_rtn

METHODS = ("rtn", "awq", "gptq", "easyquant")
CALIBRATED_METHODS = ("awq", "gptq")


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only integer quantization of linear layers; see the module docstring.

    >>> Pipeline("quantize(bits=4,group_size=32,method=gptq)")
    """

    name = "quantize"
    bits: int = 4
    group_size: int = 128              # -1: one group per channel
    sym: bool = False
    group_axis: str = "in"             # "out": per-IC grouping (AdaDim)
    method: str = "rtn"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    calibration_batches: int = 128
    # gptq
    damp: float = 0.01                 # fraction of mean diag(H) added to the diagonal
    block_size: int = 128              # columns per lazy-update block
    # awq
    awq_grid: int = 20                 # alphas 0, 1/grid, ... (grid-1)/grid
    clip_search: bool = True
    # easyquant
    outlier_sigma: float = 3.0         # weights beyond this many std of their row stay float
    range_steps: int = 100             # gradient steps of the range optimization

    def __post_init__(self) -> None:
        check_option(isinstance(self.bits, int) and 2 <= self.bits <= 8,
                     f"quantize: bits={self.bits!r} is out of range; use an integer from 2 to 8")
        check_option(self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0),
                     f"quantize: group_size={self.group_size!r} must be a positive integer or -1 (per channel)")
        check_option(self.group_axis in GROUP_AXES,
                     f"quantize: group_axis={self.group_axis!r} must be one of {GROUP_AXES}")
        check_option(self.method in METHODS, f"quantize: method={self.method!r} must be one of {METHODS}")
        check_option(0 <= self.damp < 1, f"quantize: damp={self.damp} must be in [0, 1)")
        check_option(self.block_size > 0 and self.awq_grid > 0 and self.range_steps >= 0 and self.outlier_sigma > 0,
                     "quantize: block_size, awq_grid and outlier_sigma must be positive, range_steps >= 0")

    def spec_for(self, site: LinearSite) -> QuantSpec:
        """The layer's QuantSpec; a PassError naming the layer when the options cannot apply to it."""
        group = resolve_group_size(self.name, site, self.group_size, self.group_axis)
        spec = QuantSpec(bits=self.bits, group_size=group, sym=self.sym)
        check_packable(self.name, site, spec, self.group_axis)
        return spec

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        selection = select_sites(gm, self.name, self.targets, self.exclude, self.include_lm_head)
        sites = selection.sites
        specs = {s.node.name: self.spec_for(s) for s in sites}  # every layer checked before any change
        notes: dict = {"method": self.method, "layers": len(sites)}
        semantics = Semantics()
        stats = {}
        if self.method in CALIBRATED_METHODS:
            require_batches(ctx, self.name, self.method, sites)
            stats = capture_linear_inputs(gm, ctx, sites, max_batches=self.calibration_batches,
                                          pass_name=self.name, method=self.method)
            if self.method == "gptq":
                _warn_rank_deficient(sites, stats, self.damp, notes)
        if self.method == "awq":
            from fxforge.passes.quantize.awq import apply_awq_scales

            notes["awq"] = apply_awq_scales(gm, sites, specs, stats, self, semantics)
        extra_sites: list = []
        for site in ctx.progress(sites, desc=f"quantize ({self.method})", total=len(sites)):
            spec = specs[site.node.name]
            matrix = orient(weight_of(gm, site).float(), self.group_axis)
            qm, outliers = self._quantize_matrix(matrix, spec, site, stats), None
            if isinstance(qm, tuple):  # easyquant: (codes, sparse outliers)
                qm, outliers = qm
                notes["outlier_weights"] = notes.get("outlier_weights", 0) + int(outliers.values.numel())
            semantics.replace_weight(site.weight_name, claimed_weight(qm, outliers, self.group_axis))
            new = emit_weight_only(gm, site, qm, spec, self.group_axis)
            if outliers is not None:
                from fxforge.passes.quantize.easyquant import emit_outliers

                emit_outliers(gm, new, outliers, self.group_axis)
                extra_sites.append(site.module_path)
        if extra_sites:
            notes["sparse_outlier_layers"] = len(extra_sites)
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, notes=notes, semantics=semantics)

    def _quantize_matrix(self, matrix, spec: QuantSpec, site: LinearSite, stats: dict):
        if self.method == "rtn":
            return quantize_weight_rtn(matrix, spec)
        if self.method == "gptq":
            from fxforge.passes.quantize.gptq import quantize_weight_gptq

            return quantize_weight_gptq(matrix, spec, stats[site.node.name].hessian, self.group_axis,
                                        damp=self.damp, block_size=self.block_size)
        if self.method == "awq":
            from fxforge.passes.quantize.awq import quantize_weight_awq

            return quantize_weight_awq(matrix, spec, stats[site.node.name], self.group_axis,
                                       clip_search=self.clip_search and not _is_query_or_key(site))
        from fxforge.passes.quantize.easyquant import quantize_weight_easyquant

        return quantize_weight_easyquant(matrix, spec, sigma=self.outlier_sigma, steps=self.range_steps)


def claimed_weight(qm, outliers, group_axis: str):
    """ŵ (out, in) a quantized layer claims to compute with: the chosen codes dequantized
    (`QuantizedMatrix.dequantize`, from the unpacked codes, so a packing bug cannot hide),
    plus EasyQuant's float outliers, in the weight's orientation."""
    dense = qm.dequantize()
    if outliers is not None and outliers.values.numel():
        dense = dense.index_put((outliers.rows, outliers.cols), outliers.values.to(dense.dtype), accumulate=True)
    return dense if group_axis == "in" else dense.T.contiguous()


def _is_query_or_key(site: LinearSite) -> bool:
    """AWQ skips clip search on q/k: their error is amplified by the softmax, not seen in q·Wᵀ MSE."""
    leaf = site.module_path.rsplit(".", 1)[-1]
    return leaf in ("q_proj", "k_proj", "query", "key", "c_attn", "qkv_proj", "Wqkv")


__all__ = ["Quantize", "METHODS", "aten"]


def _warn_rank_deficient(sites, stats: dict, damp: float, notes: dict) -> None:
    """GPTQ with fewer calibration rows than input features has a singular Hessian and fits
    the calibration set instead of the layer: on minilm at 2 bits with 190 tokens (< 384
    features) held-out cosine fell to 0.10 at damp=0.01 versus 0.36 for RTN, and rose to 0.46
    / 0.54 at damp=0.1 / 0.5. Say so rather than return a quietly worse model."""
    short = [(site.module_path, stats[site.node.name].rows, site.in_features) for site in sites
             if stats[site.node.name].rows < site.in_features]
    if not short:
        return
    notes["rank_deficient_layers"] = len(short)
    path, rows, features = short[0]
    warnings.warn(
        f"quantize(method='gptq'): {len(short)} layer(s) saw fewer calibration tokens than input features "
        f"(e.g. {path}: {rows} < {features}), so their Hessian is singular and GPTQ will overfit the "
        f"calibration set. Give more calibration data (hundreds of thousands of tokens is standard) or "
        f"raise damp (now {damp}; 0.1 or more).", stacklevel=2)
