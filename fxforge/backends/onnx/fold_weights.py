"""Store 8-bit weights in the layout their ONNX op reads: fold Transpose(initializer) at export.

fxforge ops keep linear weights as (N, K), PyTorch's layout; ORT's integer GEMMs
(DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMulInteger) read B as (K, N). The lowerings
write that as Transpose(qweight). The backend exports with optimize=False (see backend.py),
so the Transpose would stay in the file: ORT would fold it when a session opens, holding both
copies while it does, and the file would not show what the kernel consumes. This pass replaces
each such Transpose by a transposed initializer.

Only int8/uint8 initializers whose sole consumer is the Transpose are folded, so no tensor is
ever duplicated (a tied float embedding, say) and float graphs are left exactly as exported.
"""
from __future__ import annotations

import onnx_ir as ir

FOLDED_DTYPES = (ir.DataType.INT8, ir.DataType.UINT8)


def fold_weight_transposes(model: ir.Model) -> int:
    """Fold every Transpose of a sole-use 8-bit initializer in `model`'s main graph; returns the count."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if (source is None or not source.is_initializer() or source.const_value is None
                or source.dtype not in FOLDED_DTYPES or len(source.uses()) != 1 or node.outputs[0].is_graph_output()):
            continue
        perm_attr = node.attributes.get("perm")
        array = source.const_value.numpy()
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(reversed(range(array.ndim)))
        transposed = ir.Value(name=f"{source.name}_transposed", const_value=ir.tensor(array.transpose(perm).copy()))
        transposed.shape = ir.Shape(transposed.const_value.shape)
        transposed.type = ir.TensorType(source.dtype)
        graph.register_initializer(transposed)
        node.outputs[0].replace_all_uses_with(transposed)
        graph.remove(node, safe=True)
        del graph.initializers[source.name]
        folded += 1
    return folded
