"""Pass `quantize`: weight-only integer quantization of linear layers (bits 2-8).

    aten.linear(x, W, b) -> fxforge.linear_wq(x, qweight, scales, zeros, b, bits, group_size)
                            (group_axis="in": groups of input channels; MatMulNBits on ONNX)
                         -> fxforge.linear_wq_ic(x, qweightᵀ, scales, zeros, b, bits, group_size)
                            (group_axis="out": per-IC groups along the output dimension)

`method` picks how codes are chosen (TECHNIQUES.md, Quantization): `rtn` (round to nearest),
`awq` (calibration: activation-aware scales folded into the producer, then clip search),
`gptq` (calibration: Hessian-based error feedback), `easyquant` (data-free: outliers kept in
float as a sparse add, ranges optimized by gradient descent). Each is one registered class
(`method.py`; rtn.py, awq.py, gptq.py, easyquant.py) with its own options; the pass keeps every
method's options for pipeline strings, and an option of another method is a PassSpecError.
Calibrated methods run block by block through `fxforge.calibration.engine`: block i is
calibrated on the outputs of blocks 0..i-1 already quantized, then quantized, and only its
statistics are in memory. Codes of 3 bits are stored in
4-bit containers, 5-7 bits in 8-bit ones. Symmetric quantization uses the fixed zero point
2^(bits-1), so both variants share one storage format. The sibling passes (`llm_int8`,
`quantize_fp`, `quantize_dynamic`, `bitdelta`) live next to this file.

Semantics (what verification holds the result to, exactly): the graph before with each
rewritten linear's weight replaced by the dequantized weight the method chose, ŵ = (q - z)·s
from the unpacked codes (plus EasyQuant's float outliers), and for AWQ the producers it
rescaled by 1/s. The loss against the float graph is measured and reported, not bounded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.fx import GraphModule

from fxforge.calibration.engine import BlockCalibration, calibrate
from fxforge.calibration.streaming import rewrite_by_block, spill
from fxforge.ir.graph import LinearSite, aten
from fxforge.ir.ops.linear_wq import chunked_linear_many
from fxforge.ir.scratch import scratch
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.methods import method_options, methods_of
from fxforge.passes.quantize import awq as _awq, easyquant as _easyquant, gptq as _gptq  # noqa: F401 (register)
from fxforge.passes.quantize.common import (
    GROUP_AXES, check_option, check_packable, emit_weight_only, orient, resolve_group_size,
    weight_of,
)
from fxforge.passes.quantize.method import FAMILY, QuantizedLayer, WeightQuantizer
from fxforge.passes.quantize.rtn import QuantSpec
from fxforge.passes.registry import register_pass
from fxforge.passes.selection import LayerSelection

METHODS = tuple(methods_of(FAMILY))
CALIBRATED_METHODS = tuple(name for name, cls in methods_of(FAMILY).items() if cls.needs_calibration)


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only integer quantization of linear layers; see the module docstring.

    The defaults (`quantize(bits=4)`: rtn with clip search, asymmetric, group_size=64, LM head
    included) were chosen by measurement (bench/cpu_llm.py, TinyLlama shapes on ONNX Runtime's
    MatMulNBits; bench/README.md): they read ~9% fewer weight bytes per token than symmetric
    g=32 (onnxruntime-genai's builder), at the same weight error on Gaussian and Student-t
    weights (clip search buys back what the larger group costs). What they trade: the LM head is
    int4 too (it is the largest matrix of a small LLM's decode step: float, it made decoding 2x
    slower), which moves logits more than the layers do (`include_lm_head=False` keeps it
    float; a tied head is quantized for the linear only, the embedding stays float and is stored
    once); clip search costs 2-3x plain RTN's quantization time (`clip_search=False`: plain RTN);
    `group_size=32` is more accurate and slower, 128 faster and less accurate.

    >>> Pipeline("quantize(bits=4,group_size=32,method=gptq)")
    """

    name = "quantize"
    consumes = frozenset({"linear"})  # passes/compatibility.py (produces: below)
    bits: int = 4
    group_size: int = 64               # -1: one group per channel; a layer narrower than one group
                                       # gets one group per channel when `targets` is not given
    sym: bool = False
    group_axis: str = "in"             # "out": per-IC grouping (AdaDim)
    method: str = "rtn"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = True       # the head is the largest matrix of a small LLM's decode step
    calibration_batches: int = 128
    # the methods' own options (each checked by its method class; one of another method is an error)
    # rtn, awq
    clip_search: bool = True           # rtn: per-group range of lowest weight error; awq: of lowest output error
    # gptq
    damp: float = 0.01                 # fraction of mean diag(H) added to the diagonal
    block_size: int = 128              # columns per lazy-update block
    # awq
    awq_grid: int = 20                 # alphas 0, 1/grid, ... (grid-1)/grid
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
        check_option(isinstance(self.calibration_batches, int) and self.calibration_batches > 0,
                     f"quantize: calibration_batches={self.calibration_batches!r} must be a positive integer")
        self.method_object()  # the method's own checks, and no option of another method

    @property
    def produces(self) -> str:  # type: ignore[override]  # passes/compatibility.py
        return "linear_wq" if self.group_axis == "in" else "linear_wq_ic"

    def method_object(self) -> WeightQuantizer:
        """The chosen method with its options (PassSpecError for an unknown method or a foreign option)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return method_options(FAMILY, self.method, options, defaults)

    def _grouped_len(self, site: LinearSite) -> int:
        return site.in_features if self.group_axis == "in" else site.out_features

    def narrower_than_a_group(self, sites: list[LinearSite]) -> set[str]:
        """Node names of the layers that get one group per channel: the pass chose the layers itself
        (no `targets`), the layer's grouped axis is shorter than one group (a model's 16-wide
        projection under group_size=32), and other layers of the model do fit whole groups. A layer
        named in `targets`, or a model none of whose layers fits the group size, keeps the error:
        that group size was the user's mistake, not an odd layer's."""
        if self.targets is not None or self.group_size == -1:
            return set()
        if not any(self._grouped_len(s) >= self.group_size for s in sites):
            return set()
        return {s.node.name for s in sites if self._grouped_len(s) < self.group_size}

    def spec_for(self, site: LinearSite, one_group_per_channel: bool = False) -> QuantSpec:
        """The layer's QuantSpec; a PassError naming the layer when the options cannot apply to it."""
        group_size = -1 if one_group_per_channel else self.group_size
        group = resolve_group_size(self.name, site, group_size, self.group_axis)
        spec = QuantSpec(bits=self.bits, group_size=group, sym=self.sym)
        check_packable(self.name, site, spec, self.group_axis)
        return spec

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        method = self.method_object()
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        narrow = self.narrower_than_a_group(sites)
        # every layer checked before any change
        specs = {s.node.name: self.spec_for(s, s.node.name in narrow) for s in sites}
        notes: dict = {"method": self.method, "layers": len(sites)}
        if narrow:
            notes["one_group_per_channel"] = [s.module_path for s in sites if s.node.name in narrow]
        semantics = Semantics()
        by_node = {s.node: s for s in sites}
        if method.needs_calibration and sites:
            require_batches(ctx, self.name, self.method, sites)

            def rewrite_block(block: BlockCalibration) -> None:
                self._quantize_sites(gm, [by_node[n] for n in block.nodes], specs, block.statistics, method,
                                     semantics, notes, ctx, block.name)

            run = calibrate(gm, ctx, {s.node: method.statistics for s in sites}, rewrite_block,
                            pass_name=self.name, method=self.method, max_batches=self.calibration_batches)
            notes["calibration"] = {"batches": run.batches, "blocks": run.blocks, "offloaded": run.offloaded}
        else:  # block by block on a streamed graph (weights mapped from files), else all at once
            rewrite_by_block(gm, [s.node for s in sites], lambda nodes, where: self._quantize_sites(
                gm, [by_node[n] for n in nodes], specs, {}, method, semantics, notes, ctx, where))
        method.finish(notes)
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, notes=notes, semantics=semantics)

    def _quantize_sites(self, gm: GraphModule, sites: list[LinearSite], specs: Mapping[str, QuantSpec],
                        stats: Mapping[str, Any], method: WeightQuantizer, semantics: Semantics, notes: dict,
                        ctx: PassContext, where: str) -> None:
        """Quantize `sites` (one block, or every site for a data-free method) in place."""
        _merge_notes(notes, method.prepare_block(gm, sites, specs, stats, self.group_axis, semantics))
        desc = f"quantize ({self.method})" + (f" {where}" if where else "")
        for site in ctx.progress(sites, desc=desc, total=len(sites)):
            spec = specs[site.node.name]
            weight = weight_of(gm, site)
            # a method that converts to float32 itself (rtn by chunks, gptq into its working copy)
            # gets the weight as it is: a float32 copy here too would be one more weight-sized
            # matrix (bf16 7B head: 0.5 GiB)
            matrix = orient(weight if method.takes_low_precision else weight.float(), self.group_axis)
            del weight
            layer = method.quantize(matrix, spec, site, stats.get(site.node.name), self.group_axis)
            # the claim keeps the codes (1 byte a weight), not ŵ (4): a dense fp32 copy of every
            # quantized weight held until verification was most of quantize's peak memory
            claim = ClaimedLinear(layer, self.group_axis, weight_of(gm, site).dtype)
            claim.layer = _spill_codes(gm, claim.layer)
            semantics.replace_linear(site.weight_name, claim)
            new = emit_weight_only(gm, site, layer.matrix, spec, self.group_axis)
            if layer.outliers is not None:
                from fxforge.passes.quantize.easyquant import emit_outliers

                emit_outliers(gm, new, layer.outliers, self.group_axis)
                notes["outlier_weights"] = notes.get("outlier_weights", 0) + int(layer.outliers.values.numel())
                notes["sparse_outlier_layers"] = notes.get("sparse_outlier_layers", 0) + 1


def _merge_notes(notes: dict, more: dict) -> None:
    """Add a block's notes to the pass's: lists extend, dicts update, the rest is replaced."""
    for key, value in more.items():
        if isinstance(value, list):
            notes.setdefault(key, []).extend(value)
        elif isinstance(value, dict) and isinstance(notes.get(key), dict):
            for inner, item in value.items():
                if isinstance(item, list):
                    notes[key].setdefault(inner, []).extend(item)
                elif isinstance(item, dict):
                    notes[key].setdefault(inner, {}).update(item)
                elif isinstance(item, int) and isinstance(notes[key].get(inner), int):
                    notes[key][inner] += item
                else:
                    notes[key][inner] = item
        else:
            notes[key] = value


def claimed_weight(layer: QuantizedLayer, group_axis: str, out: Any = None):
    """ŵ (out, in) a quantized layer claims to compute with: the chosen codes dequantized
    (`QuantizedMatrix.dequantize`, from the unpacked codes, so a packing bug cannot hide),
    plus EasyQuant's float outliers, in the weight's orientation. `out`: a float32 buffer of the
    codes' shape to dequantize into (used only without outliers, group_axis "in")."""
    dense = layer.matrix.dequantize(out=out if out is not None and group_axis == "in" else None)
    outliers = layer.outliers
    if outliers is not None and outliers.values.numel():
        dense = dense.index_put((outliers.rows, outliers.cols), outliers.values.to(dense.dtype), accumulate=True)
    return dense if group_axis == "in" else dense.T.contiguous()


class ClaimedLinear:
    """`aten.linear(x, ŵ, bias)` with ŵ = `claimed_weight(layer)` built when verification runs it
    (one layer's dense weight at a time) and cast to the original weight's dtype, as a
    replaced weight would be.

    Codes below 16 are kept two to a byte (low nibble = even column), packed here by torch ops
    of its own rather than by the kernel's `pack_bits`, so a packing bug still shows as a
    mismatch; that halves the claim again (int4 of a fp32 model: 1/8 of the weights' bytes).
    """

    def __init__(self, layer: QuantizedLayer, group_axis: str, dtype: Any):
        self.group_axis, self.dtype = group_axis, dtype
        codes = layer.matrix.codes
        self.nibbles = codes.dim() == 2 and codes.shape[1] % 2 == 0 and bool(codes.numel()) and int(codes.max()) < 16
        if self.nibbles:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
            layer = dataclasses.replace(layer, matrix=dataclasses.replace(layer.matrix, codes=codes))
        self.layer = layer

    def __call__(self, x: Any, bias: Any = None) -> Any:
        return self.many([x], bias)[0]

    def many(self, xs: list[Any], bias: Any = None) -> list[Any]:
        """`self(x, bias)` for each x, building each slice of ŵ once for all (verification runs
        the reference at two shapes together: fxforge/ir/lockstep.py)."""
        if self.group_axis == "in" and self.layer.outliers is None:
            # a large layer (an LM head) a slice of rows at a time, as the eager linear_wq does;
            # each slice is consumed before the next is built: reused buffers (fxforge/ir/scratch.py)
            matrix = self.layer.matrix
            rows, k = matrix.codes.shape[0], matrix.scales.shape[1] * matrix.group_size
            return chunked_linear_many(xs, bias, rows, k, lambda start, stop: claimed_weight(
                self._rows(start, stop), self.group_axis,
                out=scratch("claim.weight", (stop - start, k), torch.float32)).to(self.dtype))
        weight = claimed_weight(self._rows(), self.group_axis).to(self.dtype)
        return [aten.linear.default(x, weight, bias) for x in xs]

    def _rows(self, start: int = 0, stop: int | None = None) -> QuantizedLayer:
        """The layer (rows start:stop of its matrix) with its codes unpacked to one a byte."""
        matrix = self.layer.matrix
        if stop is not None:
            matrix = dataclasses.replace(matrix, codes=matrix.codes[start:stop], scales=matrix.scales[start:stop],
                                         zeros=matrix.zeros[start:stop])
        if self.nibbles:
            packed = matrix.codes
            codes = scratch("claim.codes", (packed.shape[0], packed.shape[1] * 2), torch.uint8)
            pairs = codes.view(packed.shape[0], packed.shape[1], 2)
            torch.bitwise_and(packed, 15, out=pairs[..., 0])
            torch.bitwise_right_shift(packed, 4, out=pairs[..., 1])
            matrix = dataclasses.replace(matrix, codes=codes)
        return dataclasses.replace(self.layer, matrix=matrix)


def _spill_codes(gm: GraphModule, layer: QuantizedLayer) -> QuantizedLayer:
    """On a streamed graph the claim's codes go to disk with the block (they are 1 byte a weight)."""
    codes = spill(gm, {"codes": layer.matrix.codes})["codes"]
    if codes is layer.matrix.codes:
        return layer
    return dataclasses.replace(layer, matrix=dataclasses.replace(layer.matrix, codes=codes))


def require_batches(ctx: PassContext, pass_name: str, method: str, sites: list[LinearSite]) -> None:
    """A CalibrationError naming the layers and the fix when calibration data is missing or empty."""
    names = [s.module_path for s in sites]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    ctx.require_calibration(
        pass_name, f"calibration data to quantize layer(s) {shown}", method=method,
        hint=" Or use a data-free method (rtn, easyquant). The model was not changed.")


__all__ = ["Quantize", "METHODS", "CALIBRATED_METHODS", "aten"]
