"""The export's shortcuts write what the long way writes.

1. `as_exported_program`: torch.onnx is handed an ExportedProgram built from the graph's own fake
   metadata instead of re-tracing the GraphModule with torch.export. Same nodes, weights and I/O;
   the same outputs at other shapes (dynamic dims kept).
   The exporter's decomposition re-trace is skipped where it would change no op
   (`DecomposedProgram`, after `lower_composites` lowers .to/.contiguous/.reshape as it would),
   and still runs where it would.
2. `optimize_ir_once`: onnxscript's optimizer with its multi-output rule (SlicesSplit) tried only
   where it can match: byte-identical to `onnxscript.optimizer.optimize_ir(num_iterations=1)`, on
   Slices it must still try and ones it may skip, and on a KV decoder full of Slices.
"""
import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends.onnx import backend
from fxforge.backends.onnx.exported_program import DecomposedProgram, already_decomposed, as_exported_program
from fxforge.backends.onnx.optimize import keeps_storage_compact, optimize_ir_once


class HalfRotate(nn.Module):
    """Linear, a buffer, a rotate-half (two Slices of one tensor: SlicesSplit's pattern) and a
    size used as a value: the parts the program builder has to carry over."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = self.proj(x) * self.scale
        rotated = torch.cat([-h[..., 4:8], h[..., 0:4]], dim=-1)
        return rotated + x.shape[1], h.sum(-1)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return fxforge.compile(HalfRotate(), (torch.randn(2, 5, 8),), backend="eager")


def _export(gm, inputs, through_program: bool) -> onnx.ModelProto:
    original = backend.program_for_export
    try:
        if not through_program:
            backend.program_for_export = lambda g, x: g
        return ir.serde.serialize_model(backend.export_model(gm, inputs))
    finally:
        backend.program_for_export = original


def _weights(model: onnx.ModelProto) -> tuple[dict, list]:
    """({name: bytes} of the module's weights, sorted (dtype, shape, bytes) of the folded
    constants, whose generated names (`val_12`) follow the exporter's node numbering)."""
    named, constants = {}, []
    for t in model.graph.initializer:
        data = onnx.numpy_helper.to_array(t).tobytes()
        if t.name.startswith("val_"):
            constants.append((t.data_type, tuple(t.dims), data))
        else:
            named[t.name] = data
    return named, sorted(constants)


def _run(model: onnx.ModelProto, inputs) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def test_program_is_built_without_touching_the_graph(compiled):
    gm = compiled.graph_module
    code = gm.code
    program = backend.program_for_export(gm, (torch.randn(2, 5, 8),))
    assert isinstance(program, torch.export.ExportedProgram)
    lifted = {s.target for s in program.graph_signature.input_specs if s.target is not None}
    assert lifted == {"proj.weight", "proj.bias", "scale"}
    assert program.state_dict["proj.weight"] is dict(gm.named_parameters())["proj.weight"]  # shared, not copied
    assert gm.code == code and any(n.op == "get_attr" for n in gm.graph.nodes)


def test_program_exports_the_same_onnx_as_a_retrace(compiled):
    gm = compiled.graph_module
    example = (torch.randn(2, 5, 8),)
    fast, slow = _export(gm, example, True), _export(gm, example, False)
    histogram = lambda m: collections.Counter((n.domain, n.op_type) for n in m.graph.node)  # noqa: E731
    assert histogram(fast) == histogram(slow)
    assert _weights(fast) == _weights(slow)
    io = lambda m: [(v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))  # noqa: E731
                    for v in (*m.graph.input, *m.graph.output)]
    assert io(fast) == io(slow)
    assert [v.name for v in fast.graph.input] == [v.name for v in slow.graph.input] == ["x"]
    # outputs are named as the graph's own nodes (the re-trace's counters gave `add_24`)
    assert [v.name for v in fast.graph.output] == [n.name for n in gm.graph.output_node().args[0]]
    assert not fast.graph.input[0].type.tensor_type.shape.dim[1].HasField("dim_value")  # sequence stays dynamic
    for shape in ((2, 5, 8), (3, 11, 8)):
        x = (torch.randn(*shape),)
        for got, want, eager in zip(_run(fast, x), _run(slow, x), gm(*x)):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(got, eager.detach().numpy(), atol=1e-5)


class Composites(nn.Module):
    """The composite ops a trace keeps and the exporter's re-trace lowers: `.to(dtype)` as a no-op
    and as a cast, `.contiguous()` of a transpose, `.reshape()` of a contiguous tensor, and (with
    `strided_reshape`) a `.reshape()` of a transpose, which only the re-trace lowers."""

    def __init__(self, strided_reshape: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.strided_reshape = strided_reshape

    def forward(self, x, ids):
        h = self.proj(x.to(torch.float32)).transpose(1, 2)
        h = h.reshape(h.shape[0], -1) if self.strided_reshape else h.contiguous().reshape(h.shape[0], -1)
        return h + ids.to(torch.float32).sum(-1, keepdim=True)


def _export_counting_retraces(gm, example, monkeypatch) -> tuple[onnx.ModelProto, int]:
    """`gm` exported through the built program, and how many times that program was decomposed
    (re-traced) on the way."""
    retraces = []
    original = torch.export.ExportedProgram.run_decompositions

    def spy(self, *args, **kwargs):
        retraces.append(type(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", spy)
    model = _export(gm, example, True)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", original)
    return model, retraces.count(DecomposedProgram)


def _assert_runs_like(model: onnx.ModelProto, gm, reference: onnx.ModelProto | None = None) -> None:
    """Outputs of `model` equal `reference`'s and eager's, at the traced shape and another."""
    for shape in ((2, 5, 8), (3, 7, 8)):
        x = (torch.randn(*shape), torch.randint(0, 9, shape[:2]))
        got = _run(model, x)
        for i, eager in enumerate(gm(*x)):
            np.testing.assert_allclose(got[i], eager.detach().numpy(), atol=1e-5)
            if reference is not None:
                np.testing.assert_array_equal(got[i], _run(reference, x)[i])


def test_composites_are_lowered_and_the_retrace_skipped(monkeypatch):
    from fxforge.backends.onnx.exported_program import lower_composites

    torch.manual_seed(0)
    example = (torch.randn(2, 5, 8), torch.randint(0, 9, (2, 5)))
    gm = fxforge.compile(Composites(), example, backend="eager").graph_module
    aten = torch.ops.aten
    kept = collections.Counter(n.target for n in gm.graph.nodes)
    assert kept[aten.to.dtype] == 2 and kept[aten.contiguous.default] == 1 and kept[aten.reshape.default] == 1
    program = as_exported_program(gm, example)
    assert isinstance(program, DecomposedProgram)
    lowered = collections.Counter(n.target for n in program.graph.nodes)
    assert lowered[aten.to.dtype] == lowered[aten.contiguous.default] == lowered[aten.reshape.default] == 0
    assert lowered[aten._to_copy.default] == 1 and lowered[aten.clone.default] == 1  # the no-op .to is gone
    assert lower_composites(program.graph) == 0  # nothing left to lower
    fast, retraces = _export_counting_retraces(gm, example, monkeypatch)
    assert retraces == 0
    slow = _export(gm, example, False)
    histogram = lambda m: collections.Counter((n.domain, n.op_type) for n in m.graph.node)  # noqa: E731
    assert histogram(fast) == histogram(slow) and _weights(fast) == _weights(slow)
    _assert_runs_like(fast, gm, reference=slow)


def test_a_composite_left_over_is_decomposed_as_before(monkeypatch):
    torch.manual_seed(0)
    example = (torch.randn(2, 5, 8), torch.randint(0, 9, (2, 5)))
    gm = fxforge.compile(Composites(strided_reshape=True), example, backend="eager").graph_module
    program = as_exported_program(gm, example)
    assert any(n.target == torch.ops.aten.reshape.default for n in program.graph.nodes)
    assert not already_decomposed(program.graph, {})
    model, retraces = _export_counting_retraces(gm, example, monkeypatch)
    assert retraces == 1  # decomposed by the re-trace, as every program was before
    _assert_runs_like(model, gm)


def test_nodes_a_pass_added_get_an_empty_module_stack_in_the_program_only(compiled):
    gm = compiled.graph_module
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    stack = linear.meta.pop("nn_module_stack", None)  # as a node a pass inserted
    try:
        program = as_exported_program(gm, (torch.randn(2, 5, 8),))
        copied = next(n for n in program.graph.nodes if n.name == linear.name)
        assert copied.meta["nn_module_stack"] == {}  # what the re-trace gave: no exporter warning per node
        assert "nn_module_stack" not in linear.meta  # the graph itself untouched
    finally:
        if stack is not None:
            linear.meta["nn_module_stack"] = stack


def test_an_op_the_table_decomposes_is_not_skipped(compiled):
    program = as_exported_program(compiled.graph_module, (torch.randn(2, 5, 8),))
    assert already_decomposed(program.graph, {})
    assert not already_decomposed(program.graph, {torch.ops.aten.mul.Tensor: lambda a, b: a * b})
    assert not already_decomposed(program.graph, None)  # the default table: the re-trace decides


def test_graph_without_fake_values_goes_through_torch_export(compiled):
    gm = compiled.graph_module
    stripped = torch.fx.GraphModule(gm, torch.fx.Graph())
    stripped.graph.output(stripped.graph.graph_copy(gm.graph, {}))
    for node in stripped.graph.nodes:
        if node.op == "placeholder":
            node.meta = {k: v for k, v in node.meta.items() if k != "val"}
    stripped.recompile()
    assert as_exported_program(stripped, (torch.randn(2, 5, 8),)) is None
    assert backend.program_for_export(stripped, (torch.randn(2, 5, 8),)) is stripped


def _optimized_both_ways(raw: onnx.ModelProto) -> tuple[bytes, bytes, ir.Model]:
    ours, theirs = ir.serde.deserialize_model(raw), ir.serde.deserialize_model(raw)
    optimize_ir_once(ours, should_fold=keeps_storage_compact)
    onnxscript.optimizer.optimize_ir(theirs, num_iterations=1, should_fold=keeps_storage_compact)
    return (ir.serde.serialize_model(ours).SerializeToString(),
            ir.serde.serialize_model(theirs).SerializeToString(), ours)


def _slices_model() -> onnx.ModelProto:
    """x[..., 0:4] and x[..., 4:8] (SlicesSplit's pattern), a lone y[..., 0:4] (no pair) and
    an empty z[..., 0:0] (the rule may pair a Slice with itself)."""
    from onnx import TensorProto, helper

    def const(name, values):
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [helper.make_node("Slice", [src, "zero", end, "axis"], [out]) for src, end, out in
             (("x", "four", "x_lo"), ("y", "four", "y_lo"), ("z", "zero", "z_empty"))]
    nodes.append(helper.make_node("Slice", ["x", "four", "eight", "axis"], ["x_hi"]))
    nodes.append(helper.make_node("Add", ["x_lo", "x_hi"], ["x_sum"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8]) for n in "xyz"]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x_sum", "y_lo", "z_empty")]
    graph = helper.make_graph(nodes, "slices", inputs, outputs,
                              [const("zero", [0]), const("four", [4]), const("eight", [8]), const("axis", [-1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_guarded_rules_optimize_byte_identically_and_try_slices_split_only_where_it_can_match(monkeypatch):
    from onnxscript.rewriter import _rewrite_rule

    tried = []
    original = _rewrite_rule.RewriteRule.try_rewrite

    def spy(self, model, graph, node, **kwargs):
        if self.name == "SlicesSplit":
            tried.append(node.outputs[0].name)
        return original(self, model, graph, node, **kwargs)

    monkeypatch.setattr(_rewrite_rule.RewriteRule, "try_rewrite", spy)
    ours, theirs = ir.serde.deserialize_model(_slices_model()), ir.serde.deserialize_model(_slices_model())
    optimize_ir_once(ours, should_fold=keeps_storage_compact)
    ours_tried = set(tried)
    tried.clear()
    onnxscript.optimizer.optimize_ir(theirs, num_iterations=1, should_fold=keeps_storage_compact)
    assert ir.serde.serialize_model(ours) == ir.serde.serialize_model(theirs)
    assert ours_tried == {"x_lo", "z_empty"}  # x_hi starts at 4, y_lo has no second Slice of y
    assert {"x_lo", "x_hi", "y_lo", "z_empty", "x_sum"} <= set(tried)  # unguarded: every node


def test_guarded_rules_optimize_byte_identically_on_a_kv_decoder():
    from fxforge.models import get_model
    from fxforge.runtime.decoding import example_cached_inputs

    zoo = get_model("tiny-llama")
    ids = zoo.kwargs["input_ids"]
    ids = ids if ids.shape[0] >= 2 else ids.repeat(2, 1)
    compiled = fxforge.compile(zoo.model, (), {"input_ids": ids, "use_cache": False},
                               passes="fuse_attention,add_kv_cache(attention_mask=True)", backend="eager")
    gm = compiled.graph_module
    raw = ir.serde.serialize_model(backend.export_model(gm, example_cached_inputs(gm, batch=2), optimize=False))
    assert sum(n.op_type == "Slice" for n in raw.graph.node) >= 4
    ours, theirs, _ = _optimized_both_ways(raw)
    assert ours == theirs


class _MixedDtypes(torch.nn.Module):
    """Ops torch.onnx must promote explicitly: float x int64, float + int, float > int64."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, counts):
        h = self.proj(x) * counts.unsqueeze(-1)          # float32 * int64
        h = h + (counts.sum() + 1)                       # float32 + int64 scalar tensor
        return torch.where(h > counts.unsqueeze(-1), h, -h), (counts * 2).float().mean()


@pytest.mark.parametrize("model, inputs", [
    (_MixedDtypes, (torch.randn(2, 5, 8), torch.randint(0, 4, (2, 5)))),
    (HalfRotate, (torch.randn(2, 5, 8),)),
])
def test_type_promotion_reusing_graph_values_exports_the_same_onnx(model, inputs, monkeypatch):
    """fxforge/backends/onnx/type_promotion.py: torch.onnx's promotion pass fed the graph's own
    fake values writes byte for byte the model the pass that re-runs every node writes, and
    skips the fake-tensor run of every node it leaves alone."""
    import contextlib

    from fxforge.backends.onnx import type_promotion

    torch.manual_seed(0)
    gm = fxforge.compile(model(), inputs, backend="eager").graph_module
    runs = []
    base_run = torch.fx.Interpreter.run_node

    def counting(self, n):  # the ops the promotion interpreters run through fake tensors
        if "TypePromotion" in type(self).__name__ and n.op == "call_function":
            runs.append(n.name)
        return base_run(self, n)

    monkeypatch.setattr(torch.fx.Interpreter, "run_node", counting)
    fast = ir.serde.serialize_model(backend.export_model(gm, inputs))
    reran = len(runs)
    runs.clear()
    monkeypatch.setattr(type_promotion, "reusing_graph_values", contextlib.nullcontext)
    slow = ir.serde.serialize_model(backend.export_model(gm, inputs))
    assert fast == slow
    ops = sum(n.op == "call_function" for n in gm.graph.nodes)
    assert len(runs) >= ops and reran < len(runs)  # torch runs every op; the fast pass only new ones
    for got, want in zip(_run(fast, inputs), gm(*inputs)):
        np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("model, inputs", [
    (_MixedDtypes, (torch.randn(2, 5, 8), torch.randint(0, 4, (2, 5)))),
    (HalfRotate, (torch.randn(2, 5, 8),)),
])
def test_cached_torchlib_registry_exports_the_same_onnx(model, inputs, monkeypatch):
    """fxforge/backends/onnx/torchlib_registry.py: the registry built once, signatures inferred
    only for the functions a graph calls, writes byte for byte what torch's own registry (every
    signature inferred up front, rebuilt per export) writes; the second export reuses the cache."""
    import contextlib

    from torch.onnx._internal.exporter import _registration

    from fxforge.backends.onnx import torchlib_registry

    torch.manual_seed(0)
    gm = fxforge.compile(model(), inputs, backend="eager").graph_module
    builds = []
    monkeypatch.setattr(torchlib_registry, "_build", lambda v, build=torchlib_registry._build: builds.append(v) or build(v))
    monkeypatch.setattr(torchlib_registry, "_CACHE", {})
    fast = ir.serde.serialize_model(backend.export_model(gm, inputs))
    again = ir.serde.serialize_model(backend.export_model(gm, inputs))
    assert len(builds) == 1 and fast == again  # built once, and the custom table did not leak into it
    cached = torchlib_registry._CACHE[builds[0]]
    lazy = [m for metas in cached.functions.values() for m in metas if m.skip_signature_inference]
    assert len(lazy) > 300 and all(m.signature is None for m in lazy)  # onnxscript's torchlib: none parsed up front
    assert "from_torchlib" in _registration.ONNXRegistry.__dict__  # restored after the block
    monkeypatch.setattr(torchlib_registry, "cached_torchlib_registry", contextlib.nullcontext)
    slow = ir.serde.serialize_model(backend.export_model(gm, inputs))
    assert fast == slow


def test_cached_torchlib_registry_exports_the_same_int4_kv_decoder(monkeypatch):
    """The same on what the CLI exports: packed int4 linears, fused attention, a KV cache."""
    import contextlib

    from fxforge.backends.onnx import torchlib_registry
    from fxforge.models import get_model
    from fxforge.runtime.decoding import example_cached_inputs

    zoo = get_model("tiny-llama")
    ids = zoo.kwargs["input_ids"]
    ids = ids if ids.shape[0] >= 2 else ids.repeat(2, 1)
    compiled = fxforge.compile(zoo.model, (), {"input_ids": ids, "use_cache": False}, backend="eager",
                               passes="quantize(bits=4),fuse_attention,add_kv_cache(attention_mask=True)")
    gm = compiled.graph_module
    inputs = example_cached_inputs(gm, batch=2)
    fast = ir.serde.serialize_model(backend.export_model(gm, inputs))
    monkeypatch.setattr(torchlib_registry, "cached_torchlib_registry", contextlib.nullcontext)
    slow = ir.serde.serialize_model(backend.export_model(gm, inputs))
    assert any(n.op_type == "MatMulNBits" for n in fast.graph.node)
    assert fast == slow
