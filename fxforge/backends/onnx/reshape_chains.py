"""Drop Reshapes that give a value back its own shape, and shorten Reshape-of-Reshape chains.

The exporter spells each attention layer's head split and merge as Reshapes with shapes built
in the graph (`Concat(Shape(past)[0], Shape(input_ids)[1], H, D)`), and the GroupQueryAttention
rewrite (`decoder_gqa`) adds the inverse `(B, L, N, D) -> (B, L, N·D)` around them: 8 Reshapes
per layer that, composed, change nothing (the 4-layer TinyLlama decoder had 32 of them, plus the
Shape/Concat nodes computing their targets). ONNX's own tools cannot prove them redundant: the
targets are computed at run time, and onnxscript's Reshape rules look at one pair with constant
shapes.

What proves it here is the symbolic shapes torch.export recorded for every value (the exporter's
value_info: `[s2, s70, 128]`), which name equal dimensions with equal symbols. A Reshape, or a
chain of them, only relabels row-major data: when the chain's source and its end have equal
shapes, dimension by dimension (equal integers or equal symbols), the end *is* the source.
Otherwise a chain whose last target is a constant without 0 entries (0 copies a dimension of its
own input, which the chain changes) reads the source directly, skipping the middle Reshapes.
Nodes nothing reads any more are dropped.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

Dim = Union[int, str]
Shapes = dict[str, tuple[Dim, ...]]


def value_shapes(graph: onnx.GraphProto) -> Shapes:
    """{value name: shape} for the intermediate values whose every dimension is a number or a
    symbol (torch's symbolic value_info); values with an unknown dimension are left out."""
    shapes: Shapes = {}
    for info in graph.value_info:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                break
        else:
            shapes[info.name] = tuple(dims)
    return shapes


def collapse_reshapes(model: onnx.ModelProto, shapes: Shapes) -> int:
    """Rewrite `model` in place (module docstring); returns how many Reshapes were removed or
    made to read their chain's source. `shapes`: symbolic shapes of values (`value_shapes`)."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # subgraphs read outer values implicitly: the dead-node sweep below cannot see them
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}  # removed Reshape output -> the value that replaces it
    changed = 0
    for node in graph.node:
        for i, name in enumerate(node.input):  # earlier removals first: chains see their sources
            node.input[i] = renamed.get(name, name)
        if not _is_reshape(node) or node.output[0] in outputs:
            continue
        source = node.input[0]
        while source in producer and _is_reshape(producer[source]):
            source = producer[source].input[0]
        end_shape, source_shape = shapes.get(node.output[0]), shapes.get(source)
        if end_shape is not None and end_shape == source_shape:
            renamed[node.output[0]] = source
            changed += 1
        elif source != node.input[0] and _no_copied_dims(node, constants):
            node.input[0] = source
            changed += 1
    if changed:
        _drop_dead(graph)
    return changed


def _is_reshape(node: onnx.NodeProto) -> bool:
    return node.op_type == "Reshape" and node.domain in ("", "ai.onnx")


def _no_copied_dims(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """True when the Reshape's target is a constant whose entries never copy an input dimension
    (no 0, or allowzero=1 where 0 means an empty dimension)."""
    target = constants.get(node.input[1]) if len(node.input) > 1 else None
    if target is None:
        return False
    allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
    return allow_zero or not np.any(numpy_helper.to_array(target) == 0)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (transitively), and initializers nothing reads."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)


__all__ = ["collapse_reshapes", "value_shapes"]
