"""fxforge::linear_wq -> com.microsoft::MatMulNBits (+ Add for the bias).

The op's packed weight is already MatMulNBits' layout (element k of row n in byte
(k*bits)//8, low bits first), so B is only reshaped to (N, n_blocks, blob_size).

Zero points: the op's uint8 zeros (N, n_blocks), one code a byte, are packed to the same bit
width in the graph, so that the export is valid as written; `fold_matmul_nbits_constants` (run by
the backend's post-export optimization) then replaces that chain by one initializer in
MatMulNBits' own layout, or drops the input where every zero point is the op's default
2^(bits-1) (symmetric quantization): a quantized linear is one MatMulNBits node (+ Add for the
bias), with nothing for ONNX Runtime to fold or run per call. Measured on ONNX Runtime 1.32 CPU,
2048x2048 int4, g=128, one thread: uint8 zero points run at 0.49 ms (batch 1) with accuracy_level
4, while float zero points take ~22 ms (they disable the int8 kernels) and are refused outright
for 8-bit weights. So: packed uint8 zero points, or none.

accuracy_level 4 (the default of the backend option `accuracy_level`, see `OnnxOptions`) lets
ORT quantize activations to int8 per block: about 4x faster than level 0 for int4 and 30x for
int8 at batch 1, at ~0.5% relative output error against the float reference. Compile with
`backend_options={"accuracy_level": 0}` for float-exact results.
MatMulNBits needs a power-of-two block size >= 16; other group sizes are refused at export.

Scales are cast to a static type (not CastLike against the activation): the backend exports
with optimize=False, and a CastLike whose second input is a graph value is not folded, so ORT
saw non-constant scales and its accuracy_level-4 kernel then gave ~60% relative error on
tiny-gpt2 (exact at level 0 or with optimizations off).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
from onnx.defs import OpSchema
from onnxscript import BFLOAT16, FLOAT, INT32, UINT8
from onnxscript.values import Op

from fxforge.backends.onnx.lowerings import msft
from fxforge.backends.onnx.lowerings import opset as op
from fxforge.backends.onnx.options import OnnxOptions
from fxforge.ir.ops import register_lowering
from fxforge.ir.verify import FLOAT32_REORDERED, Tolerance

# What compile()'s backend check allows at accuracy_level 4: ~0.5% per layer, compounding
# through a model (tiny-llama at 8 bits: 0.7%); a packing or scale bug is ~100%.
ACCURACY_LEVEL_4_TOLERANCE = Tolerance.lossy(max_rel=3e-2, min_cosine=0.999)


def backend_tolerance(backend_options: Mapping[str, Any]) -> Tolerance | None:
    """How far from the reference this lowering may land under `backend_options`: the int8
    activation bound unless accuracy_level is 0 (float compute: exact up to float32 rounding)."""
    if OnnxOptions.from_backend_options(backend_options).accuracy_level:
        return ACCURACY_LEVEL_4_TOLERANCE
    return FLOAT32_REORDERED


def _matmul_nbits_schema() -> OpSchema:
    """The part of com.microsoft::MatMulNBits' schema this lowering uses.

    The onnx package ships no com.microsoft schemas and the exporter needs one to tell inputs
    from attributes; the optional g_idx and bias inputs are left out (the bias is an Add).
    """
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed weight"),
            ("T3", ["tensor(uint8)"], "packed zero points"),
        ],
        attributes=[
            attr("K", OpSchema.AttrType.INT, "input features"),
            attr("N", OpSchema.AttrType.INT, "output features"),
            attr("bits", OpSchema.AttrType.INT, "container width"),
            attr("block_size", OpSchema.AttrType.INT, "group size"),
            attr("accuracy_level", OpSchema.AttrType.INT, "minimum compute precision"),
        ],
    )


_MATMUL_NBITS = Op(msft, "MatMulNBits", _matmul_nbits_schema())


def check_block_size(group_size: int) -> None:
    """MatMulNBits' block_size must be a power of two >= 16; say what to do otherwise."""
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(
            f"fxforge::linear_wq: group_size={group_size} cannot be exported to ONNX: "
            f"com.microsoft::MatMulNBits needs a block size that is a power of two >= 16. "
            f"Quantize with such a group size (e.g. group_size=32, 64 or 128), or use the triton or "
            f"eager backend for this model."
        )


def _pack_zero_points(zeros, bits: int, n: int, n_blocks: int):
    """uint8 (N, n_blocks) codes -> uint8 (N, ceil(n_blocks*bits/8)), packed like the weight."""
    if bits == 8:
        return zeros
    per_byte = 8 // bits
    padded_blocks = -(-n_blocks // per_byte) * per_byte
    codes = op.Cast(zeros, to=INT32.dtype)
    if padded_blocks != n_blocks:
        codes = op.Pad(codes, op.Constant(value_ints=[0, 0, 0, padded_blocks - n_blocks]))
    codes = op.Reshape(codes, op.Constant(value_ints=[n, padded_blocks // per_byte, per_byte]))
    shifts = op.Constant(value_ints=[1 << (i * bits) for i in range(per_byte)])
    packed = op.ReduceSum(op.Mul(codes, op.Cast(shifts, to=INT32.dtype)), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Cast(packed, to=UINT8.dtype)


@register_lowering("onnx", "linear_wq", tolerance=backend_tolerance)
def linear_wq_onnx(x, qweight, scales, zeros, bias, bits: int, group_size: int, *, options: OnnxOptions):
    check_block_size(group_size)
    n = qweight.shape[0]
    k = qweight.shape[1] * 8 // bits
    n_blocks = k // group_size
    b = op.Reshape(qweight, op.Constant(value_ints=[n, n_blocks, group_size * bits // 8]))
    # MatMulNBits on CPU takes float32 or float16 activations; bf16 goes through float32.
    compute_dtype = FLOAT.dtype if x.dtype == BFLOAT16.dtype else x.dtype
    a = op.Cast(x, to=compute_dtype) if x.dtype == BFLOAT16.dtype else x
    # static target type: constant-foldable (see above); none where the scales already have it
    scales = scales if scales.dtype == compute_dtype else op.Cast(scales, to=int(compute_dtype))
    y = _MATMUL_NBITS(
        a,
        b,
        scales,
        _pack_zero_points(zeros, bits, n, n_blocks),
        K=k,
        N=n,
        bits=bits,
        block_size=group_size,
        accuracy_level=options.accuracy_level,
    )
    if bias is not None:
        y = op.Add(y, bias if bias.dtype == compute_dtype else op.Cast(bias, to=int(compute_dtype)))
    return op.Cast(y, to=BFLOAT16.dtype) if x.dtype == BFLOAT16.dtype else y


# The nodes `_pack_zero_points` emits, which `fold_matmul_nbits_constants` walks back through.
_PACKING_OPS = frozenset({"Cast", "Pad", "Reshape", "Mul", "ReduceSum"})


def fold_matmul_nbits_constants(graph: ir.Graph) -> int:
    """Give every MatMulNBits whose zero points come from an initializer through our packing
    chain (or directly, at 8 bits) those zero points as one packed initializer; drop the input
    where all equal the op's default 2^(bits-1). Returns how many nodes changed.

    Why after export rather than in the lowering: the exporter hands lowerings symbolic values
    (no constant data), so the packing can only be computed once the initializers are attached.
    onnxscript's folder leaves the chain alone (its Cast to int32 widens the bytes, which
    `keeps_storage_compact` refuses), and ORT would fold it at every session start. The packed
    tensor is lazy (computed when the file is written), so no copy is held in memory.
    """
    changed = 0
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.inputs) < 4:
            continue
        source = _zero_point_source(node.inputs[3])
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        bits, n, k, block = attrs.get("bits", 4), attrs["N"], attrs["K"], attrs["block_size"]
        n_blocks = -(-k // block)
        if source is None or tuple(source.const_value.shape) != (n, n_blocks) or \
                source.const_value.dtype != ir.DataType.UINT8:
            continue
        codes = source.const_value
        if bool((codes.numpy() == (1 << (bits - 1))).all()):
            node.resize_inputs(3)  # MatMulNBits' default zero point: 2^(bits-1)
        elif node.inputs[3] is not source:
            packed_shape = (n, -(-n_blocks * bits // 8))
            lazy = ir.LazyTensor(lambda codes=codes, bits=bits: ir.Tensor(pack_zero_points(codes.numpy(), bits)),
                                 dtype=ir.DataType.UINT8, shape=ir.Shape(packed_shape), name=f"{source.name}.packed")
            value = ir.Value(name=lazy.name, shape=ir.Shape(packed_shape), type=ir.TensorType(ir.DataType.UINT8),
                             const_value=lazy)
            graph.register_initializer(value)
            node.replace_input_with(3, value)
        else:
            continue
        changed += 1
    return changed


def _zero_point_source(value: ir.Value | None) -> ir.Value | None:
    """The uint8 initializer a zero-point input is packed from, or None if it is anything else."""
    while value is not None and not (value.is_initializer() and value.const_value is not None):
        producer = value.producer()
        if producer is None or producer.op_type not in _PACKING_OPS or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return value


def pack_zero_points(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (N, n_blocks) codes -> MatMulNBits' packed (N, ceil(n_blocks*bits/8)), low bits first."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    n, n_blocks = codes.shape
    padded = np.zeros((n, -(-n_blocks // per_byte) * per_byte), np.uint8)
    padded[:, :n_blocks] = codes
    # one OR per field on uint8 (codes < 2**bits, so the fields never overlap): a quarter of the
    # memory traffic of summing shifted uint32 fields (0.28 s of a 4-layer TinyLlama-shaped export)
    packed = padded[:, 0::per_byte].copy()
    for field in range(1, per_byte):
        packed |= padded[:, field::per_byte] << np.uint8(field * bits)
    return packed
