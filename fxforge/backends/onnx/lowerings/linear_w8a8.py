"""fxforge::linear_w8a8 -> ONNX Runtime's integer GEMM kernels (VNNI / AVX512-VNNI / AMX on x86).

Both modes end in `com.microsoft::MatMulIntegerToFloat`, ORT's uint8 x int8 MLAS GEMM.

act_scale="tensor": `DynamicQuantizeLinear(x)` -> (x_u8, s, zp), one scale and zero point per
tensor, then `com.microsoft::MatMulIntegerToFloat(x_u8, W8ᵀ, s, wscale, zp, -, bias)`: uint8 x
int8 with int32 accumulation, s·wscale[n] and the bias applied in the GEMM's output stage.
ORT's DynamicQuantizeMatMul computes exactly this (same quantizer functions, same GEMM call),
but in one node per linear; split, ORT's common-subexpression elimination merges the identical
DynamicQuantizeLinear nodes of linears sharing an input (q/k/v, gate/up), as in the graphs ORT's
own quantize_dynamic writes: measured 9% faster on a q/k/v group at 128 tokens, same at 1 token,
bit-identical outputs.

act_scale="token": the symmetric per-row codes come from one blocked `QuantizeLinear` (block =
the row, zero point 128: the int8 codes shifted to uint8; `_int8_codes`, bit-identical to the
reference; 7-9% faster than five element-wise ops), and
`com.microsoft::MatMulIntegerToFloat(x_u8, W8ᵀ, s_x, wscale, 128)` runs the same uint8 x int8
GEMM with the row scales s_x (…, M, 1) as its A scale: ORT applies wscale[n] in the GEMM's
output stage and then multiplies by s_x[m] (ScaleOutput), (acc·wscale[n])·s_x[m], the
reference's order bit for bit (checked against ORT 1.32); the bias follows in its own Add,
because ORT would add it before the row scale. Measured on bench/cpu_llm.py's 4-layer
TinyLlama-shaped decoder, prefill at 128 tokens, interleaved against the previous lowering
(A scale 1, then a Mul by s_x; loaded 2-core host): 0.987x the time at 1 thread, 0.97x at 2,
17 nodes fewer. A 1-D x has a one-element s_x, which ORT folds into the column scales
(acc·(s_x·wscale[n]), another rounding): there the Mul stays. That row scaling is still a pass
of its own over the output (ORT's ScaleOutput, one thread; MLAS's GEMM output stage takes
per-column scales only): measured at 3-4% of the decoder's 128-token prefill (a copy of the file
whose GEMMs took a constant A scale ran 1.015x ORT's quantize_dynamic, the real one 1.045x, in
thread CPU time at 1 thread). The per-tensor mode has no such pass. The fused gate/up GEMM's
output would pay a Split copy on top; the ONNX decoder runs it as one GEMM per half instead
(backends/onnx/split_integer_gemm.py).
Per token, each token's output depends on that token alone, which is what a KV cache (and any
batch of unrelated sequences) needs; per tensor, the other tokens' range sets every token's
scale (see passes/quantize/quantize_dynamic.py).

The weight is consumed as an int8 (K, N) initializer with per-column float32 scales: the
Transpose of the (N, K) buffer written here is folded at export (backends/onnx/optimize.py),
and the GEMM pre-packs the constant B once when the session opens (MatMulIntegerBase::PrePack).

Why not the previous lowering (uint8 x uint8 MatMulInteger, both operands shifted by 128):
MLAS has no VNNI kernel for u8u8; it was 2.5x slower than ORT's own quantize_dynamic at
128-token prefill. Host requirement for exactness: on x86 CPUs without VNNI, ORT's u8s8 kernel
(`vpmaddubsw`) saturates int16 pair sums, as ORT documents for its own quantize_dynamic (an
earlier measurement here: 10-14% error on full-range weights); with VNNI (`vpdpbusd`, AVX-VNNI,
AMX; this project's bench host) and on Arm (`udot`/`sdot`) the product is exact, and the
ONNX model matches the reference bit for bit.
"""
from __future__ import annotations

import numpy as np
from onnx.defs import OpSchema
from onnxscript import FLOAT
from onnxscript.values import Op

from fxforge.backends.onnx.lowerings import msft
from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.lowerings._int8_codes import UINT8_ZERO_POINT, quantize_per_token_uint8, scalar
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import Tolerance

# The bound a whole model holding W8A8 linears meets against eager. Each op is bit-exact to its
# reference (tests/backends/onnx/test_lowering_linear_w8a8.py asserts that, to 1e-5), but rounding
# activations is a step function: the ONNX model's other kernels (fused attention, skip norms)
# sum in another order, and wherever a value sits on a rounding boundary that 1e-7 difference
# becomes a whole quantization step. Measured on bench/cpu_llm.py's 4-layer TinyLlama-shaped
# decoder: relative L2 0.0102, cosine 0.99995 on the logits; 3x room. The same amplification
# is why add_kv_cache checks these graphs on their float surrogate (passes/kv_cache/token_mixing.py).
MODEL_TOLERANCE = Tolerance.lossy(max_rel=0.03, min_cosine=0.999)


def _matmul_integer_to_float_schema() -> OpSchema:
    """com.microsoft::MatMulIntegerToFloat (the onnx package ships no contrib schemas)."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "MatMulIntegerToFloat",
        "com.microsoft",
        1,
        inputs=[param("A", "T1"), param("B", "T2"), param("a_scale", "T3"), param("b_scale", "T3"),
                param("a_zero_point", "T1", param_option=optional), param("b_zero_point", "T2", param_option=optional),
                param("bias", "T3", param_option=optional)],
        outputs=[param("Y", "T3")],
        type_constraints=[("T1", ["tensor(uint8)"], "activations"), ("T2", ["tensor(int8)"], "weight"),
                          ("T3", ["tensor(float)"], "scales, output")],
    )


_MATMUL_INTEGER_TO_FLOAT = Op(msft, "MatMulIntegerToFloat", _matmul_integer_to_float_schema())


def _as_float(value):
    """value as float32; no node when it already is, so initializers reach the op directly."""
    return value if value.dtype == FLOAT.dtype else op.Cast(value, to=FLOAT.dtype)


@register_lowering("onnx", "linear_w8a8", tolerance=MODEL_TOLERANCE)
def linear_w8a8_onnx(x, qweight, wscale, bias, act_scale: str = "tensor"):
    # qweight's int8 dtype, the shapes and act_scale were checked by the op's fake impl at trace time.
    x32 = _as_float(x)
    w_kn = op.Transpose(qweight, perm=[1, 0])  # folded into a (K, N) initializer at export (optimize.py)
    w_scale = _as_float(wscale)
    b32 = _as_float(bias) if bias is not None else None
    if act_scale == "tensor":
        x_u8, x_scale, x_zero_point = op.DynamicQuantizeLinear(x32)
        y = _MATMUL_INTEGER_TO_FLOAT(x_u8, w_kn, x_scale, w_scale, x_zero_point, None, b32)
    else:
        x_u8, x_scale = quantize_per_token_uint8(x32, qweight.shape[1])
        zero_point = op.Constant(value=scalar(UINT8_ZERO_POINT, np.uint8))
        if x.shape is not None and len(x.shape) >= 2:
            # (…, M, 1) row scales: ORT scales by them after the column scales, as the reference
            y = _MATMUL_INTEGER_TO_FLOAT(x_u8, w_kn, x_scale, w_scale, zero_point)
        else:  # a one-element A scale would be folded into the column scales: keep the order by hand
            one = op.Constant(value_float=1.0)
            y = op.Mul(_MATMUL_INTEGER_TO_FLOAT(x_u8, w_kn, one, w_scale, zero_point), x_scale)
        if b32 is not None:
            y = op.Add(y, b32)
    return y if x.dtype == FLOAT.dtype else op.Cast(y, to=x.dtype)
