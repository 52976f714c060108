"""Pass `quantize_dynamic`: W8A8, int8 weights per channel, 8-bit activations quantized at run time.

    aten.linear(x, W, b) -> fxforge.linear_w8a8(x, W8, s_w, b, act_scale)
    s_w[n] = max|W[n, :]| / 127,  W8 = clamp(round(W / s_w), -127, 127)   (per output channel)

Activations are quantized when the op runs, per tensor (asymmetric uint8) or per token
(symmetric int8): see fxforge/ir/ops/linear_w8a8.py. ONNX lowers both to ORT's integer GEMM
(com.microsoft::MatMulIntegerToFloat), Triton to the int8 tl.dot GEMM.

Semantics (verified exactly): the graph before with each rewritten linear computing
fxforge::linear_w8a8's reference on the int8 codes and scales chosen here, i.e. activations
quantized at run time times Ŵ = W8·s_w. Modelling the run-time activation rounding matters: a
reference with float activations would differ by the activation loss, and one that rounds
differently would flip roundings downstream; this one agrees bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxforge.ir.graph import LinearSite, add_attr, replace_with_call
from fxforge.ir.ops import get_op
from fxforge.ir.ops.linear_w8a8 import ACT_SCALES
from fxforge.ir.reference import Semantics
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.context import PassContext
from fxforge.passes.registry import register_pass
from fxforge.passes.quantize.common import bias_node, check_option, weight_of
from fxforge.passes.selection import LayerSelection

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
    """W8A8: int8 weights per channel, 8-bit activations per tensor or per token, int32 accumulation.

    `act_scale` picks how activations are quantized when the op runs: "tensor" (default) gives
    each linear's whole input one asymmetric uint8 scale, exactly what ORT's own
    quantize_dynamic graphs run (DynamicQuantizeLinear + MatMulIntegerToFloat); "token" gives
    every token its own symmetric int8 scale.

    What the default trades, measured by bench/w8a8_cpu.py (TinyLlama-shaped Llama, 4 layers,
    LM head quantized, 2-core AVX512-VNNI VM): "token" has ~36% lower logits error (rel L2 0.071
    vs 0.111, top-1 agreement with fp32 0.83 vs 0.79), but its 128-token prefill is 4-6% slower
    (the per-token quantization is standard ops, plus a pass rescaling the output), and only
    "tensor" keeps pace with ORT's quantize_dynamic (0.97-1.03x its time) - at lower error than
    that peer (0.111 vs 0.124: per-channel weight scales). Decode (1 token) is equally fast
    either way. Pick "token" where per-token activation ranges differ widely (outlier tokens).

    A KV cache needs "token": per tensor, each token's scale depends on the other tokens (and
    on other sequences of a batch), so a cached 1-token step would compute something else, and
    add_kv_cache refuses such graphs. Run fuse_attention before this pass: an exact pass after
    it reorders float sums that the activation rounding turns into quantization steps.

    What "token" costs in the KV-cached decoder (bench/cpu_llm.py, `fuse_attention,
    quantize_dynamic(include_lm_head=True,act_scale=token)`, 4-layer TinyLlama-shaped Llama,
    128-token prefill against ORT's quantize_dynamic on the same fused file, interleaved rounds,
    paired per round; loaded 2-core AVX512-VNNI VM): lower logits error than that peer (rel L2
    0.0645 vs 0.0828: per-channel weight scales, per-token activations) at 0.99-1.02x its
    prefill time at 1 thread (thread CPU time, medians of four runs; 1.04-1.06x before the
    ONNX decoder ran the fused gate/up GEMM as one GEMM per half, backends/onnx/
    split_integer_gemm.py), and 1.07-1.11x at 2 threads (wall time, loaded host). The price of
    per token on ORT's kernels is one extra pass over every W8A8 output: MatMulIntegerToFloat
    applies per-column (weight) scales inside the GEMM but per-row (token) scales in a separate
    single-threaded pass (ScaleOutput), 3-4% of the 1-thread prefill (a copy of the file whose
    GEMMs took a constant A scale ran 1.015x the peer where the real one ran 1.045x) and more
    at 2 threads, where the rest runs on both cores; ORT's per-tensor DynamicQuantizeMatMul has
    no such pass. Decode (1 token) costs the same either way.
    """

    name = "quantize_dynamic"
    consumes = frozenset({"linear"})  # passes/compatibility.py
    produces = "linear_w8a8"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    include_lm_head: bool = False
    act_scale: str = "tensor"

    def __post_init__(self) -> None:
        check_option(self.act_scale in ACT_SCALES,
                     f"quantize_dynamic: act_scale must be one of {ACT_SCALES}, got {self.act_scale!r}")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        op = get_op("linear_w8a8").overload
        selection = LayerSelection.of(self).sites(gm, self.name)
        sites = selection.sites
        semantics = Semantics()
        for site in sites:
            attrs = int8_weight_attrs(gm, site, semantics, Int8Claim, self.act_scale)
            replace_with_call(gm, site.node, op, (site.input, *attrs, bias_node(site), self.act_scale))
        return PassResult(gm, sites=len(sites), skipped=selection.skipped, semantics=semantics)
