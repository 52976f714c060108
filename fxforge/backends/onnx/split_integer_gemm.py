"""A W8A8 GEMM whose output is only cut into column blocks -> one GEMM per block, no Split.

    MatMulIntegerToFloat(A, B, a_s, b_s, …) -> Split(axis=-1, sizes)
        =>  MatMulIntegerToFloat(A, Slice(B, cols j), a_s, Slice(b_s, cols j), …)   for each block j

`fuse_projections` merges gate/up into one `linear_w8a8` followed by a split of its output, which
ONNX Runtime runs as a Split that copies the (tokens x 2·intermediate) output once more; with
per-token activation scales that copy comes on top of the pass ORT makes to apply the row scales
(MatMulIntegerToFloat's ScaleOutput), so the fused GEMM cost more than two. Per block, the same
quantized A (quantized once: the quantizer's nodes are shared) meets its own columns of B: every
output element is computed exactly as before (MLAS scales and sums each column on its own), so
the result is bit-identical, and the Split is gone. The weight blocks are `Slice`s of the
initializer, which ORT folds into constant initializers when the session opens (so each block's
B is pre-packed like any weight; the file's weights are not rewritten, and external data is never
read here; a session opened with graph optimizations off would slice B at every run instead).
Measured on bench/cpu_llm.py's 4-layer TinyLlama-shaped W8A8 decoder, 128-token
prefill, 1 thread, thread CPU time, interleaved against the file without this rewrite: 0.95-0.96x
(gate/up of 4 layers; peak RSS at session load +8 MiB).

q/k/v needs no such rewrite: the decoder feeds the fused projection to GroupQueryAttention
packed (backends/onnx/decoder_gqa.py). Only GEMMs whose B, B scales (and zero points, bias) are
initializers and whose one consumer is a Split along the last axis with sizes known from the file
are rewritten; anything else is left as it is.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"
_B, _B_SCALE, _B_ZERO_POINT, _BIAS = 1, 3, 5, 6  # MatMulIntegerToFloat's per-column inputs


def split_integer_gemms(model: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> int:
    """Rewrite, in place, each MatMulIntegerToFloat whose output only a column Split reads into one
    GEMM per block (see the module docstring). Returns how many GEMMs were split.

    `shapes` (value name -> shape, e.g. the exporter's symbolic shapes) tells a Split's positive
    axis is the last one; without the GEMM output's rank only axis -1 qualifies."""
    shapes = shapes or {}
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    removed_splits: list[onnx.NodeProto] = []
    for gemm in graph.node:
        if gemm.op_type != "MatMulIntegerToFloat" or gemm.domain != MS_DOMAIN or gemm.output[0] in outputs:
            continue
        readers = consumers.get(gemm.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Split" or readers[0].domain not in ("", "ai.onnx"):
            continue
        split = readers[0]
        weight = inits.get(gemm.input[_B])
        if weight is None or len(weight.dims) != 2:
            continue
        sizes = _split_sizes(split, inits, weight.dims[1])
        columns = _per_column_inputs(gemm, inits, weight.dims[1])
        rank = len(shapes[gemm.output[0]]) if shapes.get(gemm.output[0]) is not None else None
        if sizes is None or columns is None or _axis(split) not in (-1, (rank or 0) - 1):
            continue
        replaced[id(gemm)] = _blocks(graph, gemm, split, sizes, columns)
        dropped.add(id(split))
        removed_splits.append(split)
    if replaced:
        nodes = []
        for node in graph.node:
            if id(node) in replaced:
                nodes.extend(replaced[id(node)])
            elif id(node) not in dropped:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        # the removed Splits' size lists, where nothing else reads them (ORT would warn about each)
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        sizes = {node.input[1] for node in removed_splits if len(node.input) > 1} - read
        kept = [init for init in graph.initializer if init.name not in sizes]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)
    return len(replaced)


def _blocks(graph: onnx.GraphProto, gemm: onnx.NodeProto, split: onnx.NodeProto, sizes: list[int],
            columns: list[tuple[int, int]]) -> list[onnx.NodeProto]:
    """Slices of the per-column inputs and one GEMM per block, writing the Split's outputs."""
    nodes, start = [], 0
    axes = _constant(graph, f"{gemm.name}_cols_axes", [0])
    for j, (size, out) in enumerate(zip(sizes, split.output)):
        lo = _constant(graph, f"{gemm.name}_cols{j}_start", [start])
        hi = _constant(graph, f"{gemm.name}_cols{j}_end", [start + size])
        inputs = list(gemm.input)
        for index, axis in columns:
            sliced = f"{gemm.input[index]}_cols{j}"
            axis_name = axes if axis == 0 else _constant(graph, f"{gemm.name}_cols_axes{axis}", [axis])
            nodes.append(onnx.helper.make_node("Slice", [gemm.input[index], lo, hi, axis_name], [sliced],
                                               name=f"{gemm.name}_slice{index}_{j}"))
            inputs[index] = sliced
        nodes.append(onnx.helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{gemm.name}_cols{j}",
                                           domain=MS_DOMAIN))
        start += size
    return nodes


def _per_column_inputs(gemm: onnx.NodeProto, inits: dict, n: int) -> list[tuple[int, int]] | None:
    """[(input index, axis of its N columns)] to slice, or None when a per-column input is not an
    initializer (then its blocks could not be folded into constants)."""
    columns = [(_B, 1)]
    for index in (_B_SCALE, _B_ZERO_POINT, _BIAS):
        if index >= len(gemm.input) or not gemm.input[index]:
            continue
        init = inits.get(gemm.input[index])
        if init is None:
            return None
        size = int(np.prod(init.dims)) if init.dims else 1
        if size == 1:
            continue  # one value for every column: every block reads it whole
        if list(init.dims) != [n]:
            return None
        columns.append((index, 0))
    return columns


def _split_sizes(split: onnx.NodeProto, inits: dict, n: int) -> list[int] | None:
    """The Split's block widths, when the file states them and they add up to N."""
    if len(split.input) > 1 and split.input[1]:
        init = inits.get(split.input[1])
        sizes = [int(v) for v in numpy_helper.to_array(init)] if init is not None else None
    else:
        attrs = {a.name: a for a in split.attribute}
        if "split" in attrs:
            sizes = list(attrs["split"].ints)
        else:  # equal parts (opset 18's num_outputs, or one per output before it)
            parts = attrs["num_outputs"].i if "num_outputs" in attrs else len(split.output)
            sizes = [n // parts] * parts if parts and n % parts == 0 else None
    if sizes is None or sum(sizes) != n or len(sizes) != len(split.output) or min(sizes) <= 0:
        return None
    return sizes


def _axis(split: onnx.NodeProto) -> int:
    return next((a.i for a in split.attribute if a.name == "axis"), 0)


def _constant(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    if not any(init.name == name for init in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


__all__ = ["split_integer_gemms"]
