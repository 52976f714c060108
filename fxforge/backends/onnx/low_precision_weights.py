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
- `session_options` stops ORT from folding the Casts back into float32 initializers at session
  start (its ConstantFolding would; that is the 2P this avoids) and orders execution by
  priority, so each weight is cast just before its MatMul and the float32 copy freed after it
  (the default order ran every weight Cast first: a float32 copy of all weights per run).

The cost: every run casts the weights it reads (see bench/scale.py's bf16 onnx row for decode
time against a float32 model).
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


def has_low_precision_weights(graph: ir.Graph) -> bool:
    """Whether `graph` stores low-precision weights that it casts to float32 where read."""
    return any(_is_weight_cast(node) for node in graph)


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
    import onnxruntime as ort

    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return {"disabled_optimizers": ["ConstantFolding"]}
