"""split_integer_gemms: a W8A8 GEMM read only by a column Split becomes one GEMM per block, bit-exact."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxforge.backends.onnx.split_integer_gemm import split_integer_gemms

ort = pytest.importorskip("onnxruntime")

M, K, N = 5, 16, 12


def _model(split_axis: int = 2, extra_reader: bool = False, sizes: list[int] | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), "W"),
             numpy_helper.from_array(rng.random(N, dtype=np.float32) + 0.1, "w_scale"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"),
             numpy_helper.from_array(np.uint8(128), "zp")]
    split_inputs = ["y"]
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        split_inputs.append("sizes")
    parts = len(sizes) if sizes else 2
    nodes = [helper.make_node("MatMulIntegerToFloat", ["a", "W", "a_scale", "w_scale", "zp", "", "bias"], ["y"],
                              domain="com.microsoft", name="gemm"),
             helper.make_node("Split", split_inputs, [f"part{j}" for j in range(parts)], axis=split_axis,
                              **({} if sizes else {"num_outputs": 2}))]
    outputs = [helper.make_tensor_value_info(f"part{j}", TensorProto.FLOAT, None) for j in range(parts)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["y"], ["relu"]))
        outputs.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, M, K]),
                                           helper.make_tensor_value_info("a_scale", TensorProto.FLOAT, [1, M, 1])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"a": rng.integers(0, 256, (1, M, K), dtype=np.uint8), "a_scale": rng.random((1, M, 1), dtype=np.float32)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("sizes", [[4, 8], None], ids=["sizes", "num_outputs"])
def test_column_split_becomes_one_gemm_per_block_bit_exact(sizes):
    model = _model(sizes=sizes)
    before = _run(model)
    assert split_integer_gemms(model, {"y": (1, M, N)}) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Split" not in ops and ops.count("MatMulIntegerToFloat") == 2
    # B, its scales and the bias are sliced per block; the A side is shared
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(g.input[0] == "a" and g.input[2] == "a_scale" for g in gemms)
    assert ops.count("Slice") == 2 * 3
    assert "sizes" not in {i.name for i in model.graph.initializer}  # the Split's sizes went with it
    after = _run(model)
    for b, a in zip(before, after):
        assert np.array_equal(b, a)


def test_left_alone_when_the_output_has_another_reader_or_the_split_is_not_by_columns():
    shapes = {"y": (1, M, N)}
    assert split_integer_gemms(model := _model(extra_reader=True, sizes=[4, 8]), shapes) == 0
    assert [n.op_type for n in model.graph.node].count("Split") == 1
    assert split_integer_gemms(_model(split_axis=1, sizes=[2, 3]), shapes) == 0  # tokens, not columns
    assert split_integer_gemms(_model(sizes=[4, 8]), {}) == 0  # axis 2 without a known rank: not provably last
