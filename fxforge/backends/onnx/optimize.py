"""Post-export clean-up of the ONNX model: fold constants, drop dead code and debug metadata.

`torch.onnx.export(dynamo=True, optimize=False)` writes a faithful but bloated graph: a
2-layer tiny Llama has ~570 nodes (166 Constant, 68 Cast), every linear is
`Transpose(W) -> MatMul` (so no MatMul has a constant weight and ORT's quantizers such as
`MatMulNBitsQuantizer` skip them all), and ~40% of the file is exporter debug metadata
(stack traces, FX node text, the ExportedProgram signature). `optimize_model` fixes that, in
place, on the exporter's `onnx_ir` model before it is saved:

1. pre-transposes weights (and packs MatMulNBits' zero points, `fold_matmul_nbits_constants`): `Transpose(initializer)` becomes a transposed initializer feeding
   MatMul directly (our own step, see `fold_weight_layouts`; Reshape likewise), and after step 2 a
   `Gemm(transB=1)` on a weight becomes such a MatMul (`gemm_weights_to_matmul`);
2. runs onnxscript's optimizer (`onnxscript.optimizer.optimize_ir`'s passes, one iteration:
   constant folding, its basic rewrite rules, dead-code and unused-initializer removal, common
   subexpressions; then onnx_ir's Identity elimination; `optimize_ir_once` says why its pass
   list is spelled out here) but
   not `onnxscript.rewriter.onnx_fusions`, which `torch.onnx.export(optimize=True)` adds and
   which emits opset-23 RotaryEmbedding nodes that ONNX Runtime 1.32 rejects;
3. strips debug metadata from nodes, values and the graph.

Graph input and output names are unchanged (checked). ORT's graph fusions (SkipLayerNorm,
attention, ...) are not written into the file: ORT applies them itself at session creation
(`graph_optimization_level`), for whichever execution provider the user picks, so the file
stays portable and standard-op-only apart from fxforge's own com.microsoft lowerings.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding

from fxforge.backends.onnx.lowerings.linear_wq import fold_matmul_nbits_constants

logger = logging.getLogger(__name__)

# Metadata keys written by the exporter and by the optimizer: debug information only (stack
# traces, FX node text, the torch.export signature, folding provenance); nothing reads them.
DEBUG_METADATA_PREFIXES = ("pkg.torch.", "pkg.onnxscript.")


@dataclass(frozen=True)
class OptimizeReport:
    """What `optimize_model` did: node counts before/after, weight rewrites, seconds."""

    nodes_before: int
    nodes_after: int
    weight_rewrites: int  # Transpose/Reshape(weight) folded, or Gemm on a weight made a MatMul
    seconds: float


def optimize_model(model: ir.Model) -> OptimizeReport:
    """Optimize an exported ONNX model in place (see the module docstring); returns a report."""
    start = time.perf_counter()
    input_names = [v.name for v in model.graph.inputs]
    output_names = [v.name for v in model.graph.outputs]
    nodes_before = sum(1 for _ in model.graph.all_nodes())

    folded = fold_weight_layouts(model.graph)
    folded += fold_matmul_nbits_constants(model.graph)  # zero points packed once, here, not per session
    # One pass of folding + rewrite rules, then the Identity nodes that pass leaves: the same graph
    # as the default two passes (413 nodes for the 4-layer int4 decoder either way, see
    # bench/onnx_cleanup.py) in ~60% of the time; the second pass only removed those Identities.
    optimize_ir_once(model, should_fold=keeps_storage_compact)
    ir_passes.IdentityEliminationPass()(model)
    folded += fold_weight_layouts(model.graph)  # Reshapes whose shape input was folded to a constant
    folded += gemm_weights_to_matmul(model.graph)  # on the cleaned graph: fewer nodes to walk
    ir_passes.RemoveUnusedNodesPass()(model)  # the shape constants of Reshapes folded just now
    strip_debug_metadata(model)

    # The runner feeds inputs by position and users look outputs up by name: neither may move.
    if [v.name for v in model.graph.inputs] != input_names or \
            [v.name for v in model.graph.outputs] != output_names:
        raise RuntimeError(
            f"ONNX optimization renamed the graph's inputs/outputs: {input_names} -> "
            f"{[v.name for v in model.graph.inputs]}, {output_names} -> "
            f"{[v.name for v in model.graph.outputs]}; please report this as an fxforge bug")
    report = OptimizeReport(nodes_before, sum(1 for _ in model.graph.all_nodes()), folded,
                            time.perf_counter() - start)
    logger.info("ONNX optimized: %d -> %d nodes (%d weight layouts folded or Gemms made MatMul) in %.2fs",
                report.nodes_before, report.nodes_after, report.weight_rewrites, report.seconds)
    return report


def optimize_ir_once(model: ir.Model, should_fold: Callable[[ir.Node], bool | None]) -> None:
    """`onnxscript.optimizer.optimize_ir(model, num_iterations=1, should_fold=should_fold)`: the same
    passes in the same order, with its default rewrite rules as they are except that a rule whose
    pattern has several output nodes is only tried where it can match (`_tried_where_it_can_match`).

    Why not call optimize_ir itself: its matcher for such a rule (SlicesSplit: two Slices of one
    tensor -> Split) walks the whole graph at every node it is tried on, and it is tried on every
    node: quadratic, about half of the rewriter's time on a 4-layer decoder. optimize_ir takes no
    rule list, so its pass list is spelled out here (onnxscript 0.7's `_optimizer.optimize_ir`)."""
    rules = tuple(_tried_where_it_can_match(rule) for rule in rewriter._DEFAULT_REWRITE_RULES)
    passes = ir.passes.Sequential(
        ir_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=should_fold,
                ),
                rewriter.RewritePass(rules),
                ir_passes.RemoveUnusedNodesPass(),
                ir_passes.RemoveUnusedFunctionsPass(),
                ir_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=1,
            early_stop=True,
        ),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.LiftSubgraphInitializersToMainGraphPass(),
        ir_passes.DeduplicateInitializersPass(),
        ir_passes.CommonSubexpressionEliminationPass(),
        ir_passes.OutputFixPass(),
        ir_passes.NameFixPass(),
    )
    passes(model)


class _FirstOutputGuard:
    """A multi-output rewrite rule, tried only at nodes it can match: the node must have the op
    type of the pattern's first output node (the matcher binds the node to it, and fails
    otherwise, but only after indexing the whole graph), and for Slice pairs (SlicesSplit) its
    sliced tensor must feed another Slice (the pattern's two Slices read one `x`; the matcher may
    pair a node with itself, which the rule's check only passes for an empty `x[..., 0:0]`, so
    such a Slice is still tried). Everything else is the rule's own: a guarded node is one the
    rule would not rewrite."""

    def __init__(self, rule: rewriter.RewriteRule):
        self._rule = rule
        self._op_type = rule._target_pattern.output_nodes[0].op_identifier()[1]
        self._slice_pair = rule.name == "SlicesSplit"

    def __getattr__(self, name: str):
        return getattr(self._rule, name)

    def try_rewrite(self, model: ir.Model, graph_or_function: ir.Graph | ir.Function, node: ir.Node, **kwargs):
        if node.op_type != self._op_type:
            return None
        if self._slice_pair and not _feeds_another_slice(node):
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _feeds_another_slice(node: ir.Node) -> bool:
    """Whether SlicesSplit could match with this Slice as its first: the rule's check needs its
    start to be the constant 0 and its end a constant, and a second Slice of the same input (or
    itself, which the check passes only when that end is 0 too, see _FirstOutputGuard)."""
    def constant(i: int) -> list | None:
        value = node.inputs[i] if len(node.inputs) > i else None
        return None if value is None or value.const_value is None else value.const_value.numpy().reshape(-1).tolist()

    source = node.inputs[0] if node.inputs else None
    if source is None or constant(1) != [0] or constant(2) is None:
        return False
    if constant(2) == [0]:
        return True
    return any(user is not node and user.op_type == "Slice" and index == 0 for user, index in source.uses())


def _tried_where_it_can_match(rule: rewriter.RewriteRule) -> rewriter.RewriteRule:
    """`rule` itself, or guarded by `_FirstOutputGuard` where its pattern has several output nodes
    whose first has a known op type (see optimize_ir_once)."""
    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or pattern.has_single_output_node or pattern.output_nodes[0].op_identifier() is None:
        return rule
    return _FirstOutputGuard(rule)  # type: ignore[return-value]


# Below this many bytes a folded result is shape arithmetic or a small table: always worth it.
SMALL_FOLD_BYTES = 1024


def keeps_storage_compact(node: ir.Node) -> bool | None:
    """onnxscript's `should_fold`: refuse folds that would store more bytes than they consume.

    Lowerings of compressed weights (shift_add_linear's sign planes, MatMulNBits' zero-point
    packing, fp8/int8 dequantization) keep the packed tensors in the file and rebuild from them
    in the graph, for ONNX Runtime to fold at session start: the file stays compressed. The
    folder's own limits count elements, not bytes, and allow small tensors anyway, so without
    this it expanded such chains into float32 weights in the file. None: the folder's rules.
    Transpose/Reshape of a weight: False, `fold_weight_layouts` does it (lazily, keeping names).
    """
    if node.op_type in _LAYOUT_OPS and _is_weight(node.inputs[0]):
        return False
    out_bytes = _nbytes(node.outputs[0]) if node.outputs else None
    if out_bytes is None or out_bytes <= SMALL_FOLD_BYTES:
        return None
    in_bytes = sum(_nbytes(v) or 0 for v in node.inputs if v is not None and v.const_value is not None)
    return False if out_bytes > in_bytes else None


def _nbytes(value: ir.Value) -> int | None:
    """Bytes of `value` from its static shape and type; None where either is unknown."""
    if value.const_value is not None:
        return value.const_value.nbytes
    if value.shape is None or value.dtype is None or not value.shape.is_static():
        return None
    return int(math.prod(value.shape.numpy()) * value.dtype.itemsize)


_LAYOUT_OPS = ("Transpose", "Reshape")


def fold_weight_layouts(graph: ir.Graph) -> int:
    """Replace `Transpose(weight)` and `Reshape(weight, constant)` by a weight initializer
    already in that layout; returns how many.

    Why our own step rather than onnxscript's folder: the folder skips nodes whose input has
    more than `input_size_limit` (8192) elements unless the weight has a single consumer, so a
    tied embedding / LM head (GPT-2's `wte`, Gather + Transpose) kept its Transpose and its
    MatMul had no constant weight. Raising the limit instead would also let it fold large
    dequantization chains (int8/fp8 weights widened to fp32 in the file). The folder also
    renames what it folds (MatMulNBits' packed `...qweight` became `val_123`) and materializes
    each result in memory at once; here the new layout is a `LazyTensor` under the weight's
    own name, computed one tensor at a time when the model is saved (streamed to external data
    for large models), so optimizing costs no extra copy of the weights.

    A shared weight (tied embeddings) is stored twice in the file, as it and transposed, as
    ORT's own session-time folding would hold it in memory anyway.
    """
    folded = 0
    for node in list(graph):
        if node.op_type not in _LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if not _is_weight(source) or node.outputs[0].is_graph_output():
            continue
        if node.op_type == "Transpose":
            perm_attr = node.attributes.get("perm")
            new_value = _transposed(graph, source, tuple(perm_attr.as_ints()) if perm_attr is not None else None)
        else:
            shape = _reshape_target(node)
            if shape is None:
                continue
            new_value = _relaid(graph, source, shape, lambda a, shape=shape: a.reshape(shape),
                                "reshaped_" + "x".join(map(str, shape)))
        node.outputs[0].replace_all_uses_with(new_value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def _reshape_target(node: ir.Node) -> tuple[int, ...] | None:
    """The static output shape of `Reshape(weight, shape)`, or None where shape is not constant."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    source_shape = node.inputs[0].const_value.shape.numpy()
    allow_zero = node.attributes.get("allowzero")
    target = [int(d) for d in node.inputs[1].const_value.numpy().reshape(-1)]
    if not (allow_zero is not None and allow_zero.as_int()):  # 0 copies the input's dimension
        target = [source_shape[i] if d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(source_shape) // known
    return tuple(target)


def gemm_weights_to_matmul(graph: ir.Graph) -> int:
    """`Gemm(A, W, C?, transB)` with a weight W -> `MatMul(A, W pre-transposed) (+ Add C)`.

    The exporter lowers a linear on a 2-D input (GPT-2's Conv1D reshapes to 2-D) to Gemm with
    transB=1. ORT's `MatMulNBitsQuantizer` only quantizes MatMul, so those linears stayed fp32;
    as MatMul with a constant (K, N) weight they quantize like every other linear. ORT fuses
    MatMul + Add back into Gemm at session start where that is faster. Only plain Gemms
    (alpha = beta = 1, no transA) are rewritten. Returns how many.
    """
    rewritten = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not _is_weight(node.inputs[1]):
            continue
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        weight = _transposed(graph, node.inputs[1], None) if attrs.get("transB", 0) else node.inputs[1]
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=node.name)
        new_nodes = [matmul]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            new_nodes.append(ir.node("Add", [matmul.outputs[0], node.inputs[2]], name=f"{node.name}_bias"))
        result = new_nodes[-1].outputs[0]
        result.shape, result.type = out.shape, out.type
        graph.insert_before(node, new_nodes)
        out.replace_all_uses_with(result)
        graph.remove(node, safe=True)
        result.name = out.name  # the old value is gone: keep its name for readers of the file
        rewritten += 1
    return rewritten


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _transposed(graph: ir.Graph, source: ir.Value, perm: tuple[int, ...] | None) -> ir.Value:
    """An initializer holding `source` transposed by `perm` (default: reversed axes), lazily."""
    reversed_axes = tuple(reversed(range(len(source.const_value.shape))))
    perm = perm if perm is not None else reversed_axes
    shape = tuple(source.const_value.shape[p] for p in perm)
    # the suffix names the layout (reused by every Transpose of this weight with this perm)
    suffix = "T" if perm == reversed_axes else "T" + "_".join(map(str, perm))
    return _relaid(graph, source, shape, lambda a: transpose_copy(a, perm), suffix)


# Rows of the source copied per step by `transpose_copy`: 128 float32 columns of the result
# (512 bytes a row) stay in cache while they are filled.
_TRANSPOSE_BLOCK = 128


def transpose_copy(a: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    """`np.ascontiguousarray(np.transpose(a, perm))`, the same bytes, a matrix transposed block by
    block: numpy's own copy walks the source with a stride of a whole row per element, which
    misses the cache on every one (3-4x slower on an LM head; the transposes were most of
    writing an fp32 decoder's weights)."""
    if a.ndim != 2 or tuple(perm) != (1, 0) or a.shape[0] <= _TRANSPOSE_BLOCK:
        return np.ascontiguousarray(np.transpose(a, perm))
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    for start in range(0, a.shape[0], _TRANSPOSE_BLOCK):
        out[:, start:start + _TRANSPOSE_BLOCK] = a[start:start + _TRANSPOSE_BLOCK].T
    return out


_RELAID_FROM = "fxforge.relaid_from"  # in-memory metadata: (weight name, layout) of a relaid initializer


def _relaid(graph: ir.Graph, source: ir.Value, shape: tuple[int, ...],
            relayout: Callable[[np.ndarray], np.ndarray], suffix: str) -> ir.Value:
    """An initializer holding `relayout(source)` (of `shape`), computed lazily at save time.

    A weight with no other user than the node being rewritten keeps its name (with the new
    shape); a shared one (tied embeddings) stays for its other users and the new layout is a
    new initializer `<name>.<suffix>`. `suffix` names the layout, so a weight relaid the same
    way by several nodes (a layer a model calls twice, HRM's reused blocks) gets one initializer,
    made by the first and reused by the others (ONNX IR refuses a second of the same name).
    """
    made = graph.initializers.get(f"{source.name}.{suffix}")
    if made is not None and made.meta.get(_RELAID_FROM) == (source.name, suffix):
        return made
    tensor = source.const_value

    def compute() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(relayout(tensor.numpy())), dtype=tensor.dtype)

    new_shape = ir.Shape(shape)
    lazy = ir.LazyTensor(compute, dtype=tensor.dtype, shape=new_shape, name=source.name)
    if len(source.uses()) == 1:
        source.const_value = lazy
        source.shape = new_shape
        return source
    value = ir.Value(name=f"{source.name}.{suffix}", shape=new_shape, type=ir.TensorType(tensor.dtype),
                     const_value=lazy)
    lazy.name = value.name
    value.meta[_RELAID_FROM] = (source.name, suffix)
    graph.register_initializer(value)
    return value


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the weights the file will store (lazy tensors are not evaluated).

    What decides external data: after optimization a tied weight is stored twice, so the
    file can pass protobuf's 2 GB limit where the module's parameters alone do not.
    """
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def strip_debug_metadata(model: ir.Model) -> None:
    """Drop the exporter's and optimizer's debug metadata and doc strings, everywhere."""
    scopes: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs(), *model.functions.values()]
    for scope in scopes:
        _strip(scope)
        for value in [*scope.inputs, *scope.outputs]:
            _strip(value)
        if isinstance(scope, ir.Graph):
            for value in scope.initializers.values():
                _strip(value)
    for scope in [model.graph, *model.functions.values()]:
        for node in scope.all_nodes():  # recurses into subgraphs
            node.metadata_props.clear()  # node metadata is all exporter debug information
            node.doc_string = None
            for value in node.outputs:
                _strip(value)


def _strip(item: ir.Value | ir.Graph | ir.Function) -> None:
    for key in [k for k in item.metadata_props if k.startswith(DEBUG_METADATA_PREFIXES)]:
        del item.metadata_props[key]
    if isinstance(item, ir.Value):
        item.doc_string = None
