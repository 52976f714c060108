"""RMSNorm / LayerNorm with their residual add -> ONNX Runtime's fused norm kernels.

    Add(a, b) -> RMSNorm(·, w)      =>  SkipSimplifiedLayerNormalization(a, b, w)  (+ the sum as output 3)
    Add(a, b) -> LayerNorm(·, w, β) =>  SkipLayerNormalization(a, b, w, β)
    an RMSNorm with no residual     =>  SimplifiedLayerNormalization

Done on the exported file with onnxscript's own ORT fusion rules (`onnxscript.rewriter.
ort_fusions`, maintained alongside ONNX Runtime's kernels) rather than as an fxforge IR op: the
fused op has two results (the normalized value and the residual sum the next layer adds to),
which neither the every-op test's one-result graphs nor the Triton backend hold; the decoder
graph keeps the model's own RMSNorm spelling (the task runs no `fuse_rms_norm`), which these
rules match; and ORT computes them in float32 like the reference. The decoder artifact checks
the fused file against the compiled graph (`check_decoder_onnx`).

The rules check element types and (B, S, D) shapes of intermediate values; the decoder file
carries none (its writer drops torch's symbolic value_info) and ONNX's own shape inference
stops at contrib ops (MatMulNBits, GroupQueryAttention), so ONNX Runtime's symbolic shape
inference (which knows them) annotates a copy for matching; no value_info is written back.
That tool has no rule for `com.microsoft::MatMulIntegerToFloat` (the W8A8 lowering's GEMM): it
guesses the output's element type from input 0 (uint8) and gives up at the next float op, so
the W8A8 decoder's norms stayed unfused (4-layer decoder: 282 nodes, 220 fused); `_infer_shapes` adds the
rule, a matmul shape of the scales' float type, and types opset-18 ReduceMax/ReduceMin (axes as an
input, which the tool reads only for ReduceSum/ReduceMean) as it types ReduceSum.
"""
from __future__ import annotations

import warnings

import onnx


def fuse_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its norms fused (a new ModelProto sharing nothing with `model`'s weights).

    The rules run on a light copy whose weights are graph inputs of the same type and shape
    (shape inference and matching need no weight values, and external data is never read);
    the weights are put back as initializers afterwards.
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    light, weights = _without_weights(model)
    try:
        annotated = _infer_shapes(light)
    except Exception as exc:  # ORT's tool gives up on some graphs ("Incomplete symbolic shape inference")
        # The fusions are a speed-up, not a meaning: the graph runs as exported without them.
        warnings.warn(f"ONNX Runtime's symbolic shape inference could not type this graph ({exc}); its "
                      "norms are left unfused (same results, a few more nodes).", stacklevel=2)
        return model
    typed = ir.serde.deserialize_model(annotated)
    counts = [fuse_rms_normalization(typed), fuse_skip_layer_normalization(typed), fuse_skip_rms_normalization(typed)]
    if not any(counts):
        return model
    fused = ir.serde.serialize_model(typed)
    del fused.graph.value_info[:]  # the shapes above were for matching only
    used = {name for node in fused.graph.node for name in node.input}
    for mine, original in ((fused.graph.input, model.graph.input), (fused.graph.output, model.graph.output)):
        del mine[:]  # the inference renames symbolic dims it merges: keep the declared I/O as written
        mine.extend(original)
    kept = [init for init in fused.graph.initializer if init.name in used]  # the old norms' eps/exponent go
    del fused.graph.initializer[:]
    fused.graph.initializer.extend(kept)
    fused.graph.initializer.extend(w for w in weights if w.name in used)
    return fused


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)` with a
    rule for MatMulIntegerToFloat (output: the matmul shape of A and B, the type of a_scale).

    The tool's static entry point builds its own instance (no rule can be added), and on failure
    saves "sym_shape_infer_temp.onnx" into the working directory; this runs the same steps on an
    instance that has the rule, and raises without writing anything."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    class _WithIntegerGemm(SymbolicShapeInference):
        def __init__(self) -> None:
            super().__init__(2**31 - 1, auto_merge=True, guess_output_rank=True, verbose=0)
            self.dispatcher_.setdefault("MatMulIntegerToFloat", self._matmul_integer_to_float)
            # Opset 18 moved ReduceMax/Min's axes to an input, which the tool reads for ReduceSum
            # and ReduceMean only (W8A8's per-token quantizer reduces x's rows with these).
            for reduce in ("ReduceMax", "ReduceMin"):
                self.dispatcher_.setdefault(reduce, self._infer_ReduceSum)

        def _matmul_integer_to_float(self, node: onnx.NodeProto) -> None:
            self._compute_matmul_shape(node, self.known_vi_[node.input[2]].type.tensor_type.elem_type)

    inference = _WithIntegerGemm()
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    if not complete:
        raise RuntimeError("Incomplete symbolic shape inference")
    inference._update_output_from_vi()
    return inference.out_mp_


def _without_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """(a copy whose large or external initializers are typed graph inputs, those initializers)."""
    light = onnx.ModelProto()
    light.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                   producer_name=model.producer_name))
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    weights = []
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        if init.data_location == onnx.TensorProto.EXTERNAL or count > _INLINE_ELEMENTS:
            weights.append(init)
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)  # small constants (eps, axes, shapes): the rules read them
    return light, weights


_INLINE_ELEMENTS = 64


def count_norm_fusions(model: onnx.ModelProto) -> dict[str, int]:
    """How many fused norm nodes `model` holds, by op type (for tests and reports)."""
    kinds = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
    return {kind: sum(n.op_type == kind for n in model.graph.node) for kind in kinds}


__all__ = ["count_norm_fusions", "fuse_norms"]
