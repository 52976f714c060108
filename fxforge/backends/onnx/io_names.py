"""Rename an exported ONNX model's inputs, outputs and symbolic dimensions.

The exporter names graph inputs after FX placeholders and outputs after the nodes that make
them (`linear`, `cat_4`), and symbolic dimensions after torch's symbols (`s15`, `s3 + s7`).
Runtimes look tensors up by name (`past_key_values.0.key`, dimension `batch_size`), so the
decoder artifact renames them here, on the ModelProto, after export and optimization.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import onnx


def rename_values(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Rename values everywhere they appear (graph I/O, node inputs/outputs, value_info).

    Raises ValueError if a new name is already taken by another value.
    """
    graph = model.graph
    taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    taken |= {o for node in graph.node for o in node.output} | {i.name for i in graph.initializer}
    clash = sorted(new for old, new in names.items() if new in taken and new not in names and new != old)
    if clash:
        raise ValueError(f"cannot rename: {clash} already name other values in the ONNX graph")

    def fix(items) -> None:
        for i, name in enumerate(items):
            if name in names:
                items[i] = names[name]

    for node in graph.node:  # subgraphs (If/Loop bodies) are not emitted for decoders
        fix(node.input)
        fix(node.output)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name in names:
            value.name = names[value.name]
    for init in graph.initializer:
        if init.name in names:
            init.name = names[init.name]


def set_shape(value: onnx.ValueInfoProto, dims: Sequence[int | str | None]) -> None:
    """Give `value` these dimensions: ints static, strings symbolic, None left as they are."""
    shape = value.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise ValueError(f"ONNX value {value.name!r} has rank {len(shape.dim)}, not {len(dims)}")
    for dim, want in zip(shape.dim, dims):
        if isinstance(want, str):
            dim.dim_param = want
        elif isinstance(want, int):
            dim.dim_value = want


def static_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """The static size of each dimension of `value` (None where symbolic)."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


__all__ = ["rename_values", "set_shape", "static_dims"]
