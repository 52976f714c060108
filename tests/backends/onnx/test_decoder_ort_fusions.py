"""The decoder artifact's ONNX Runtime fusions, on small graphs spelled as the exporter writes them.

Each test builds the standard-ONNX graph (the reference: opset-23 Attention over a Concat cache
with the padding mask, the model's rotary and RMSNorm spelling), rewrites a copy, and runs both
in ONNX Runtime on left-padded batches (padding *queries* included) with a past.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxforge.backends.onnx.decoder_gqa import CachedAttention, fuse_group_query_attention
from fxforge.backends.onnx.ort_norms import count_norm_fusions, fuse_norms

H, HKV, D = 4, 2, 16
BIG = 2**63 - 1


def _value(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def attention_graph(rotary_half: int = D // 2, cached: bool = True) -> onnx.ModelProto:
    """q/k/v (B, N, L, D) in; HF rotary on q and k (split at `rotary_half`); Attention over the
    past + new keys with the bool mask `tree_mask` (B, 1, L, T), as add_kv_cache builds it."""
    inits = [numpy_helper.from_array((1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32), "inv_freq"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([3], np.int64), "axis3"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([rotary_half], np.int64), "half"),
             numpy_helper.from_array(np.array([BIG], np.int64), "big")]
    n = helper.make_node
    nodes = [n("Unsqueeze", ["position_ids", "minus1"], ["pos3"]),
             n("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT),
             n("Mul", ["posf", "inv_freq"], ["freqs"]),
             n("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
             n("Cos", ["emb"], ["cos3"]), n("Sin", ["emb"], ["sin3"]),
             n("Unsqueeze", ["cos3", "one"], ["cos"]), n("Unsqueeze", ["sin3", "one"], ["sin"])]
    for x in ("q", "k"):
        nodes += [n("Mul", [x, "cos"], [f"{x}_c"]),
                  n("Slice", [x, "zero", "half", "axis3", "one"], [f"{x}_1"]),
                  n("Slice", [x, "half", "big", "axis3", "one"], [f"{x}_2"]),
                  n("Neg", [f"{x}_2"], [f"{x}_n"]),
                  n("Concat", [f"{x}_n", f"{x}_1"], [f"{x}_rh"], axis=-1),
                  n("Mul", [f"{x}_rh", "sin"], [f"{x}_s"]),
                  n("Add", [f"{x}_c", f"{x}_s"], [f"{x}_rot"])]
    if cached:
        nodes += [n("Concat", ["past_key_values.0.key", "k_rot"], ["present.0.key"], axis=2),
                  n("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=2)]
        keys, values = "present.0.key", "present.0.value"
    else:
        keys, values = "k_rot", "v"
    nodes.append(n("Attention", ["q_rot", keys, values, "tree_mask"], ["y"], scale=0.3, is_causal=0))
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [_value("input_ids", i64, ["B", "L"]), _value("attention_mask", i64, ["B", "T"]),
              _value("position_ids", i64, ["B", "L"]),
              _value("past_key_values.0.key", f, ["B", HKV, "P", D]),
              _value("past_key_values.0.value", f, ["B", HKV, "P", D]),
              _value("q", f, ["B", H, "L", D]), _value("k", f, ["B", HKV, "L", D]), _value("v", f, ["B", HKV, "L", D]),
              _value("tree_mask", TensorProto.BOOL, ["B", 1, "L", "T"])]
    outputs = [_value("y", f, ["B", H, "L", D])]
    if cached:
        outputs += [_value("present.0.key", f, ["B", HKV, "T", D]), _value("present.0.value", f, ["B", HKV, "T", D])]
    graph = helper.make_graph(nodes, "decoder_attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def padding_mask(mask: np.ndarray, new: int) -> np.ndarray:
    """kv_cache/padding.py's mask: key j visible iff (j <= P + i and a token) or j == P + i."""
    total = mask.shape[1]
    keys, queries = np.arange(total)[None, :], np.arange(total - new, total)[:, None]
    allowed = (mask[:, None, None, :] != 0) & (keys <= queries)
    return allowed | (keys == queries)


def feeds(batch: int, past: int, new: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + new), np.int64)
    mask[0, :3] = 0  # left padding; with past == 0, rows of padding queries too
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, past:]
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {"input_ids": np.zeros((batch, new), np.int64), "attention_mask": mask, "position_ids": positions,
            "past_key_values.0.key": normal(batch, HKV, past, D), "past_key_values.0.value": normal(batch, HKV, past, D),
            "q": normal(batch, H, new, D), "k": normal(batch, HKV, new, D), "v": normal(batch, HKV, new, D),
            "tree_mask": padding_mask(mask, new)}


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in names})


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


LAYER = {"past_key_values.0.key": CachedAttention(q_heads=H, kv_heads=HKV, head_dim=D)}
CASES = [(2, 0, 6), (3, 5, 3), (3, 7, 1)]  # (batch, past, new): prompt, continued prompt, decode step


@pytest.mark.parametrize("rotary_length", [None, 64], ids=["rotary-outside", "rotary-inside"])
def test_cached_attention_becomes_one_gqa_node_and_matches_the_standard_graph(rotary_length):
    reference = attention_graph()
    fused = copy.deepcopy(reference)
    assert fuse_group_query_attention(fused, LAYER, rotary_length=rotary_length) == 1
    kinds = ops(fused)
    assert kinds.count("GroupQueryAttention") == 1 and "Attention" not in kinds
    assert kinds.count("Concat") == (3 if rotary_length is None else 0)  # the cache Concats are gone
    assert ("Cos" in kinds) == (rotary_length is None)  # rotary moved into the op (or stayed outside)
    gqa = next(node for node in fused.graph.node if node.op_type == "GroupQueryAttention")
    assert list(gqa.output[1:]) == ["present.0.key", "present.0.value"]
    for batch, past, new in CASES:
        inputs = feeds(batch, past, new, seed=past)
        for want, got in zip(run(reference, inputs), run(fused, inputs)):
            assert want.shape == got.shape
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_a_rotary_spelling_gqa_cannot_express_stays_outside_the_op():
    reference = attention_graph(rotary_half=4)  # not half of the head: not HF's rotate_half
    fused = copy.deepcopy(reference)
    assert fuse_group_query_attention(fused, LAYER, rotary_length=64) == 1
    assert "Cos" in ops(fused) and "Neg" in ops(fused)
    gqa = next(node for node in fused.graph.node if node.op_type == "GroupQueryAttention")
    assert not any(a.name == "do_rotary" and a.i for a in gqa.attribute)


def test_attention_without_a_cache_or_an_unknown_layer_is_left_alone():
    plain = attention_graph(cached=False)
    assert fuse_group_query_attention(plain, LAYER, rotary_length=64) == 0
    cached = attention_graph()
    assert fuse_group_query_attention(cached, {}, rotary_length=64) == 0  # no FX record for the layer
    assert "Attention" in ops(plain) and "Attention" in ops(cached)


def norm_graph() -> onnx.ModelProto:
    """h = a + b; y = w * (h * rsqrt(mean(h²) + eps)) spelled as the exporter writes the HF RMSNorm."""
    n = helper.make_node
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [n("Add", ["a", "b"], ["h"]), n("Pow", ["h", "two"], ["sq"]),
             n("ReduceMean", ["sq", "last"], ["ms"], keepdims=1, noop_with_empty_axes=0), n("Add", ["ms", "eps"], ["mse"]),
             n("Sqrt", ["mse"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]), n("Mul", ["h", "inv"], ["normed"]),
             n("Mul", ["w", "normed"], ["y"]), n("Add", ["h", "y"], ["next"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "norm", [_value("a", f, ["B", "S", 16]), _value("b", f, ["B", "S", 16])],
                              [_value("next", f, ["B", "S", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_residual_add_and_rms_norm_become_skip_simplified_layer_normalization():
    reference = norm_graph()
    fused = fuse_norms(reference)
    assert count_norm_fusions(fused)["SkipSimplifiedLayerNormalization"] == 1
    assert "Pow" not in ops(fused) and [o.name for o in fused.graph.output] == ["next"]
    rng = np.random.default_rng(0)
    inputs = {"a": rng.standard_normal((2, 3, 16)).astype(np.float32),
              "b": rng.standard_normal((2, 3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, inputs)[0], run(reference, inputs)[0], atol=1e-5, rtol=1e-5)


def reshape_chain_graph() -> onnx.ModelProto:
    """x (B, L, 8) -> split heads (B, L, 2, 4) with a shape built in the graph -> merged back
    (B, L, 8) -> Relu -> y; and x -> (B, L, 2, 4) -> (B·L, 8) -> Relu -> z, a chain that changes x."""
    n = helper.make_node
    inits = [numpy_helper.from_array(np.array([2, 4], np.int64), "heads"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), "merge"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "rows")]
    nodes = [n("Shape", ["x"], ["bl"], start=0, end=2), n("Concat", ["bl", "heads"], ["split_shape"], axis=0),
             n("Reshape", ["x", "split_shape"], ["x4"]), n("Reshape", ["x4", "merge"], ["x3"]),
             n("Relu", ["x3"], ["y"]), n("Reshape", ["x4", "rows"], ["x2"]), n("Relu", ["x2"], ["z"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "heads", [_value("x", f, ["B", "L", 8])],
                              [_value("y", f, ["B", "L", 8]), _value("z", f, [None, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_reshape_chains_that_cancel_are_dropped_and_others_read_their_source():
    from fxforge.backends.onnx.reshape_chains import collapse_reshapes

    reference = reshape_chain_graph()
    collapsed = copy.deepcopy(reference)
    shapes = {"x": ("s0", "s1", 8), "x4": ("s0", "s1", 2, 4), "x3": ("s0", "s1", 8), "x2": ("s2", 8)}
    assert collapse_reshapes(collapsed, shapes) == 2
    by_output = {node.output[0]: node for node in collapsed.graph.node}
    assert list(by_output["y"].input) == ["x"]  # (B, L, 2, 4) -> (B, L, 8) gave x back: both Reshapes gone
    assert list(by_output["x2"].input) == ["x", "rows"]  # (B·L, 8) is not x: one Reshape, from x
    assert ops(collapsed) == ["Relu", "Reshape", "Relu"]  # the shape computation went with them
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    for want, got in zip(run(reference, {"x": x}), run(collapsed, {"x": x})):
        np.testing.assert_array_equal(got, want)
    unknown = copy.deepcopy(reference)  # without shapes nothing cancels; the constant (B·L, 8) reads x
    assert collapse_reshapes(unknown, {}) == 1 and ops(unknown).count("Reshape") == 3
    assert list(next(node for node in unknown.graph.node if node.output[0] == "x2").input) == ["x", "rows"]
    for want, got in zip(run(reference, {"x": x}), run(unknown, {"x": x})):
        np.testing.assert_array_equal(got, want)


def packed_gqa_graph() -> onnx.ModelProto:
    """qkv (B, L, (H + 2·Hkv)·D) -> Split -> GroupQueryAttention over a past, as the decoder
    artifact writes a fuse_projections q/k/v projection before pack_qkv_inputs."""
    n = helper.make_node
    widths = [H * D, HKV * D, HKV * D]
    inits = [numpy_helper.from_array(np.array(widths, np.int64), "widths")]
    nodes = [n("Split", ["qkv", "widths"], ["q", "k", "v"], axis=2),
             n("GroupQueryAttention", ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value",
                                       "seqlens_k", "total_sequence_length"],
               ["y", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=H, kv_num_heads=HKV)]
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [_value("qkv", f, ["B", "L", sum(widths)]),
              _value("past_key_values.0.key", f, ["B", HKV, "P", D]),
              _value("past_key_values.0.value", f, ["B", HKV, "P", D]),
              _value("seqlens_k", i32, ["B"]), _value("total_sequence_length", i32, [])]
    outputs = [_value("y", f, ["B", "L", H * D]), _value("present.0.key", f, ["B", HKV, "T", D]),
               _value("present.0.value", f, ["B", HKV, "T", D])]
    graph = helper.make_graph(nodes, "packed", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_a_split_qkv_projection_feeds_group_query_attention_packed():
    from fxforge.backends.onnx.decoder_gqa import pack_qkv_inputs

    reference = packed_gqa_graph()
    packed = copy.deepcopy(reference)
    shapes = {"qkv": ("B", "L", (H + 2 * HKV) * D), "q": ("B", "L", H * D), "k": ("B", "L", HKV * D),
              "v": ("B", "L", HKV * D)}
    assert pack_qkv_inputs(packed, shapes) == 1
    assert ops(packed) == ["GroupQueryAttention"] and list(packed.graph.node[0].input[:3]) == ["qkv", "", ""]
    swapped = {**shapes, "k": ("B", "L", H * D)}  # widths that are not the op's packed layout: left alone
    assert pack_qkv_inputs(copy.deepcopy(reference), swapped) == 0
    rng = np.random.default_rng(1)
    for batch, past, new in [(2, 5, 1), (1, 0, 4)]:
        inputs = {"qkv": rng.standard_normal((batch, new, (H + 2 * HKV) * D)).astype(np.float32),
                  "past_key_values.0.key": rng.standard_normal((batch, HKV, past, D)).astype(np.float32),
                  "past_key_values.0.value": rng.standard_normal((batch, HKV, past, D)).astype(np.float32),
                  "seqlens_k": np.full(batch, past + new - 1, np.int32),
                  "total_sequence_length": np.array(past + new, np.int32)}
        for want, got in zip(run(reference, inputs), run(packed, inputs)):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_norms_stay_unfused_with_a_warning_when_ort_cannot_type_the_graph(monkeypatch):
    # ORT's symbolic shape inference gives up on some graphs (seen: an op it has no rule for);
    # the fusions are optional, so the export goes on without them
    from fxforge.backends.onnx import ort_norms

    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])]))

    def gives_up(*args, **kwargs):
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(ort_norms, "_infer_shapes", gives_up)
    with pytest.warns(UserWarning, match="norms are left unfused"):
        assert fuse_norms(model) is model


def w8a8_norm_graph() -> onnx.ModelProto:
    """norm_graph's residual add and RMSNorm, its input `a` the per-token W8A8 linear as
    lowerings/linear_w8a8.py writes it: MatMulIntegerToFloat(x_u8, W8, 1, s_w, 128) * s_x."""
    model = norm_graph()
    n = helper.make_node
    rng = np.random.default_rng(3)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.integers(-127, 128, (8, 16), dtype=np.int8), "w8"),
        numpy_helper.from_array(rng.random(16, dtype=np.float32) * 0.01, "w_scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "unit"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    model.graph.node.insert(0, n("MatMulIntegerToFloat", ["x_u8", "w8", "unit", "w_scale", "zp"], ["acc"],
                                 domain="com.microsoft"))
    model.graph.node.insert(1, n("Mul", ["acc", "x_scale"], ["a"]))
    a = next(i for i in model.graph.input if i.name == "a")
    model.graph.input.remove(a)
    model.graph.input.extend([_value("x_u8", TensorProto.UINT8, ["B", "S", 8]),
                              _value("x_scale", TensorProto.FLOAT, ["B", "S", 1])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_norms_after_a_w8a8_linear_fuse():
    # ORT's symbolic shape inference has no rule for MatMulIntegerToFloat: without ort_norms' own,
    # it typed the output uint8 and gave up, leaving every norm of a W8A8 decoder unfused
    reference = w8a8_norm_graph()
    fused = fuse_norms(reference)
    assert count_norm_fusions(fused)["SkipSimplifiedLayerNormalization"] == 1
    assert "Pow" not in ops(fused) and "MatMulIntegerToFloat" in ops(fused)
    rng = np.random.default_rng(0)
    inputs = {"x_u8": rng.integers(1, 256, (2, 3, 8), dtype=np.uint8),
              "x_scale": rng.random((2, 3, 1), dtype=np.float32),
              "b": rng.standard_normal((2, 3, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(fused, inputs)[0], run(reference, inputs)[0], atol=1e-5, rtol=1e-5)
