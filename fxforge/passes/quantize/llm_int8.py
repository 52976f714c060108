"""Pass `llm_int8`: LLM.int8() mixed-precision decomposition, no calibration.

    aten.linear(x, W, b) -> fxforge.linear_int8_mixed(x, W8, s_w, b, threshold)

Weights are int8 per output row (absmax); at run time input columns with any |x| ≥ threshold
(6.0 by default) multiply in float against the dequantized int8 weight columns, the rest go
through int8×int8→int32 with per-token scales (fxforge/ir/ops/linear_int8_mixed.py).

Semantics (verified exactly): linear_int8_mixed's reference on the codes and scales chosen
here, in place of each rewritten linear of the graph before (see `quantize_dynamic`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from fxforge.ir.graph import replace_with_call
from fxforge.ir.ops import get_op
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.quantize.common import bias_node, check_option
from fxforge.passes.selection import LayerSelection
from fxforge.passes.quantize.quantize_dynamic import Int8Claim, int8_weight_attrs


class MixedInt8Claim(Int8Claim):
    op_name = "linear_int8_mixed"


@register_pass
@dataclass(frozen=True)
class LlmInt8(Pass):
    """LLM.int8(): int8 weights, outlier activation columns in float."""

    name = "llm_int8"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    produces = "linear_int8_mixed"
    threshold: float = 6.0
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        check_option(self.threshold > 0, f"llm_int8: threshold={self.threshold} must be positive (default 6.0)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        op = get_op("linear_int8_mixed").overload
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        semantics = Semantics()
        for site in sites:
            attrs = int8_weight_attrs(gm, site, semantics, MixedInt8Claim, float(self.threshold))
            replace_with_call(gm, site.node, op, (site.input, *attrs, bias_node(site), float(self.threshold)))
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, semantics=semantics)
