"""bfloat16/float16 weights kept in their dtype in a graph that computes in float32.

A low-precision model exported for ONNX Runtime's CPU provider computes in float32
(compute_dtype.py), but its weights stay bfloat16/float16: `as_float32_graph` casts each read
of a weight, so the exported graph has `Cast(W_bf16, to=float)` where it used to hold a float32
copy of W. The file, and ORT, then hold the model's own bytes (P) instead of 2P.

Two things keep that cheap:
- `sink_weight_casts` moves each such Cast below the layout ops and Gathers that read it:
  `Transpose(Cast(W))` becomes `Cast(Transpose(W))`, which `optimize.fold_weight_layouts` turns
  into `Cast(W^T)` with a bfloat16 W^T stored (no transpose at run time); `Gather(Cast(E), ids)`
  becomes `Cast(Gather(E, ids))`, so an embedding lookup casts a few rows, not the table.
- `defer_weight_casts` makes each MatMul's weight Cast wait for the MatMul's activation, so a
  weight is cast just before its MatMul (ORT otherwise ran every weight Cast at the start of a
  run: a float32 copy of all weights alive at once);
- `session_options` stops ORT from folding the Casts back into float32 initializers at session
  start (its ConstantFolding would: the 2P this avoids) and turns its CPU arena off, so each
  float32 copy is returned when freed (the arena kept them: +1.2 bf16 P at 2 layers).

The cost: every run casts the weights it reads, and ORT's bfloat16 Cast is slow: decoding one
token of a 2-layer TinyLlama-shaped model took 1.44 s against 0.27 s with float32 weights
(`dtype="float32"` on the backend keeps float32 weights: 2P in memory, full speed).
Measured peak of that ORT session: 0.66 GiB (bf16 weights + the LM head's float32 copy) against
0.87 GiB with float32 weights.
"""
from __future__ import annotations

from typing import Any

import onnx_ir as ir

LOW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
FLOAT = ir.DataType.FLOAT
# ops that only move or pick elements of their first input: as exact in bf16 as in float32
_MOVES = ("Transpose", "Reshape", "Gather")


def _is_weight_cast(node: ir.Node) -> bool:
    """`Cast(x, to=float)` of a low-precision weight, or of a layout op already moved onto one."""
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return False
    to = node.attributes.get("to")
    source = node.inputs[0]
    if to is None or to.as_int() != FLOAT or source is None or source.dtype not in LOW:
        return False
    if source.is_initializer() and source.const_value is not None:
        return True
    producer = source.producer()
    return producer is not None and producer.op_type in _MOVES and _weight_rooted(producer.inputs[0])


def _weight_rooted(value: ir.Value | None) -> bool:
    while value is not None:
        if value.is_initializer() and value.const_value is not None:
            return True
        producer = value.producer()
        if producer is None or producer.op_type not in _MOVES:
            return False
        value = producer.inputs[0]
    return False


def sink_weight_casts(graph: ir.Graph) -> int:
    """Move each Cast of a low-precision weight below the Transpose/Reshape/Gather nodes reading
    it (their first input), in place; returns how many moves. A no-op on other graphs."""
    moved = 0
    work = [node for node in graph if _is_weight_cast(node)]
    while work:
        cast = work.pop()
        source, wide = cast.inputs[0], cast.outputs[0]
        for user, index in list(wide.uses()):
            if user.op_type not in _MOVES or user.domain not in ("", "ai.onnx") or index != 0:
                continue
            out = user.outputs[0]
            if len(user.outputs) != 1 or out.is_graph_output():
                continue
            uses = list(out.uses())
            user.replace_input_with(0, source)
            back = ir.node("Cast", [out], attributes={"to": FLOAT})
            narrowed = back.outputs[0]
            narrowed.type, narrowed.shape = ir.TensorType(FLOAT), out.shape
            for consumer, i in uses:
                consumer.replace_input_with(i, narrowed)
            name, out.name, out.type = out.name, f"{out.name}_{source.dtype.name.lower()}", ir.TensorType(source.dtype)
            narrowed.name = name
            graph.insert_after(user, back)
            work.append(back)
            moved += 1
        if not wide.uses():
            graph.remove(cast, safe=True)
    return moved


def session_options(options: Any) -> dict[str, Any]:
    """Set ORT `options` (a SessionOptions) for a model with low-precision weights; returns the
    InferenceSession keyword arguments it also needs (see the module docstring)."""
    options.enable_cpu_mem_arena = False
    return {"disabled_optimizers": ["ConstantFolding"]}


def defer_weight_casts(graph: ir.Graph) -> int:
    """Make each MatMul's weight Cast wait for the MatMul's activation; returns how many.

    ORT schedules a node as soon as its inputs exist, and a Cast of an initializer has all its
    inputs at the start: every weight was cast at the start of each run, a float32 copy of all
    weights alive at once (the 2P this module avoids, moved into the run). So the Cast reads
    `Reshape(W, W.shape + 0 * Shape(x)[-1:])` instead, where x is the MatMul's activation: the
    same bytes (ORT's Reshape aliases its input), available only once x is, so each weight is
    cast just before its MatMul and its float32 copy freed after it. Run after optimize_model
    (a Reshape of a weight is what fold_weight_layouts would fold).
    """
    deferred = 0
    for cast in [node for node in graph if _is_weight_cast(node) and node.inputs[0].is_initializer()]:
        uses = list(cast.outputs[0].uses())
        matmuls = [user for user, index in uses if user.op_type == "MatMul" and index == 1]
        if len(uses) != 1 or not matmuls:
            continue
        matmul, weight = matmuls[0], cast.inputs[0]
        shape = ir.Value(name=f"{weight.name}.shape", shape=ir.Shape([len(weight.shape)]),
                         type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor([int(d) for d in weight.shape], dtype=ir.DataType.INT64,
                                               name=f"{weight.name}.shape"))
        graph.register_initializer(shape)
        last = ir.node("Shape", [matmul.inputs[0]], attributes={"start": -1})
        zero = ir.node("Mul", [last.outputs[0], ir.Value(name=f"{weight.name}.zero", shape=ir.Shape([]),
                                                         type=ir.TensorType(ir.DataType.INT64),
                                                         const_value=ir.tensor(0, dtype=ir.DataType.INT64,
                                                                               name=f"{weight.name}.zero"))])
        graph.register_initializer(zero.inputs[1])
        target = ir.node("Add", [shape, zero.outputs[0]])
        reshape = ir.node("Reshape", [weight, target.outputs[0]])
        reshape.outputs[0].type, reshape.outputs[0].shape = weight.type, weight.shape
        graph.remove(cast)
        cast.replace_input_with(0, reshape.outputs[0])
        graph.insert_before(matmul, [last, zero, target, reshape, cast])
        deferred += 1
    return deferred
