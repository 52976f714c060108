"""Post-export optimization (fxforge.backends.onnx.optimize): smaller graphs, constant weights
feeding MatMul/Gemm, no exporter debug metadata, outputs unchanged, and files ORT's own
quantizer can consume."""
import collections

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
import torch
import torch.utils._pytree as pytree
from testing_utils import assert_onnx_matches_eager_at_shapes, traced_zoo
from torch import nn

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.backends.onnx.optimize import initializer_bytes
from fxforge.ir.trace import flatten_inputs, trace

ZOO = ["tiny-llama", "tiny-gpt2", "tiny-bert"]
TOL = 1e-4  # the onnx backend's default check against eager (CompiledModel._check_backend)


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def _histogram(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def _assert_clean(model: onnx.ModelProto, path) -> None:
    """No Transpose of a weight, no Constant node, no exporter metadata anywhere in the file."""
    inits = _initializer_names(model)
    assert not [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert _histogram(model)["Constant"] == 0  # all lifted to initializers or folded away
    assert all(not n.metadata_props and not n.doc_string for n in model.graph.node)
    raw = path.read_bytes()
    for marker in (b"pkg.torch", b"stack_trace", b"pkg.onnxscript"):
        assert marker not in raw


def _linear_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)


@pytest.fixture(scope="module", params=ZOO)
def exported(request, tmp_path_factory):
    """(name, graph, onnx path) of a zoo model exported by the backend (optimized)."""
    zoo, gm = traced_zoo(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export_onnx(gm, flatten_inputs(gm, zoo.args, zoo.kwargs), path)
    return request.param, gm, path


def test_optimized_export_is_clean_and_feeds_weights_to_matmul(exported):
    name, gm, path = exported
    model = onnx.load(str(path))
    _assert_clean(model, path)
    inits = _initializer_names(model)
    direct = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert len(direct) >= _linear_count(gm) > 0  # every linear's weight is an initializer input
    assert [i.name for i in model.graph.input] == [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def test_optimized_export_matches_eager_at_other_shapes(exported):
    name, gm, path = exported
    zoo, _ = traced_zoo(name)
    assert_onnx_matches_eager_at_shapes(OnnxRunner(path, threads=1), gm, zoo, tol=TOL)


def test_optimization_shrinks_the_raw_export(tmp_path):
    zoo, gm = traced_zoo("tiny-llama")
    flat = flatten_inputs(gm, zoo.args, zoo.kwargs)
    raw = onnx.load(str(export_onnx(gm, flat, tmp_path / "raw.onnx", optimize=False)))
    opt = onnx.load(str(export_onnx(gm, flat, tmp_path / "opt.onnx")))
    before, after = _histogram(raw), _histogram(opt)
    assert len(opt.graph.node) * 2 < len(raw.graph.node)  # measured: 574 -> 165
    assert after["Constant"] < before["Constant"] and after["Cast"] < before["Cast"]
    assert after["Transpose"] < before["Transpose"]
    assert (tmp_path / "opt.onnx").stat().st_size < 0.6 * (tmp_path / "raw.onnx").stat().st_size
    assert [o.name for o in opt.graph.output] == [o.name for o in raw.graph.output]


class TiedLM(nn.Module):
    """An embedding shared with the output projection, above onnxscript's fold size limit."""

    def __init__(self, vocab: int = 1000, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)  # 64,000 elements > the folder's 8,192
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def test_tied_and_large_weights_are_pretransposed_also_with_external_data(tmp_path, monkeypatch):
    from fxforge.backends.onnx import backend

    # Large models (> EXTERNAL_DATA_BYTES) are saved with external data; force that path on a
    # small model to check the lazily transposed weights stream into it.
    monkeypatch.setattr(backend, "EXTERNAL_DATA_BYTES", 0)
    model = TiedLM().eval()
    ids = torch.randint(0, 1000, (2, 7))
    gm = trace(model, (ids,))
    path = export_onnx(gm, [ids], tmp_path / "tied.onnx")
    assert (tmp_path / "tied.onnx.data").exists()
    proto = onnx.load(str(path), load_external_data=False)
    _assert_clean(proto, path)
    inits = _initializer_names(proto)
    assert sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in proto.graph.node) == 2
    # The tied weight is stored twice now: what decides external data counts both copies.
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert initializer_bytes(onnx_ir.load(str(path))) >= param_bytes + model.embed.weight.numel() * 4
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(OnnxRunner(path)(ids)[0], expected, atol=TOL, rtol=0)



class ReusedLayers(nn.Module):
    """One block applied three times (HRM's reused layers): each call transposes the same weights."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        for _ in range(3):
            x = x + torch.tanh(self.proj(x)) * torch.sigmoid(self.gate(x))
        return x


@pytest.mark.parametrize("shape", [(2, 5, 16), (5, 16)], ids=["matmul", "gemm"])
def test_a_weight_used_by_several_nodes_is_transposed_once(tmp_path, shape):
    # 3-D inputs export as Transpose(W) + MatMul, 2-D ones as Gemm(transB): both re-layouts
    # of one weight made from several nodes must share one initializer (onnx_ir refuses two of
    # the same name: the exporter failed on HRM with "Initializer '...weight.T' is already registered")
    model = ReusedLayers().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gm = trace(model, (x,))
    path = export_onnx(gm, [x], tmp_path / "reused.onnx")
    proto = onnx.load(str(path))
    _assert_clean(proto, path)
    inits = _initializer_names(proto)
    products = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert len(products) == 6
    assert len({n.input[1] for n in products}) == 2  # one stored layout per weight
    assert sum(init.dims == [16, 16] for init in proto.graph.initializer) == 2  # no stale copy left
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(OnnxRunner(path)(x)[0], expected, atol=TOL, rtol=0)

def _decoder_ids():
    from fxforge.models import get_model

    zoo = get_model("tiny-llama")
    return zoo.model, zoo.kwargs["input_ids"]


def test_kv_cache_graph_optimizes_and_matches_eager(tmp_path):
    from fxforge.ir.canonicalize import canonicalize
    from fxforge.runtime.cache_inputs import cached_inputs, empty_past
    from fxforge.runtime.meta_keys import KV_META
    from fxforge.passes.context import PassContext
    from fxforge.passes.pipeline import Pipeline

    model, ids = _decoder_ids()
    gm = trace(model, (ids,))
    canonicalize(gm)
    cached, _ = Pipeline("fuse_attention,add_kv_cache").run(gm, PassContext(example_inputs=(ids,)))
    meta = cached.meta[KV_META]
    prefill = cached_inputs(meta, ids[:, :4], 0, empty_past(meta, ids.shape[0], torch.float32))
    path = export_onnx(cached, prefill, tmp_path / "kv.onnx")
    _assert_clean(onnx.load(str(path)), path)
    runner = OnnxRunner(path, threads=1)
    with torch.no_grad():
        expected = pytree.tree_leaves(cached(*prefill))
    got = runner(*prefill)
    for e, g in zip(expected, got):
        assert (g - e).abs().max() <= TOL
    past = [got[i] for pair in meta.present for i in pair]  # then one cached step on ORT's cache
    step = cached_inputs(meta, ids[:, 4:6], 4, past)
    with torch.no_grad():
        expected = pytree.tree_leaves(cached(*step))
    for e, g in zip(expected, runner(*step)):
        assert (g - e).abs().max() <= TOL


def test_quantized_graph_keeps_matmulnbits_with_constant_weights(tmp_path):
    import fxforge

    zoo, _ = traced_zoo("tiny-llama")
    compiled = fxforge.compile(zoo.model, zoo.args, zoo.kwargs, passes="quantize(bits=4,group_size=32)",
                               backend="onnx", backend_options={"path": tmp_path / "q.onnx", "threads": 1})
    assert compiled.report.backend_check.ok  # within the lowering's declared tolerance
    model = onnx.load(str(tmp_path / "q.onnx"))
    _assert_clean(model, tmp_path / "q.onnx")
    inits = _initializer_names(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(n.input[1] in inits and n.input[2] in inits for n in nbits)


def test_ort_matmul_nbits_quantizer_consumes_the_exported_file(exported, tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    name, gm, path = exported  # GPT-2's 2-D linears were Gemm(transB=1): now MatMul too
    zoo, _ = traced_zoo(name)
    flat = flatten_inputs(gm, zoo.args, zoo.kwargs)
    model = onnx.load(str(path))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantized = quantizer.model.model
    assert _histogram(quantized)["MatMulNBits"] == _linear_count(gm)  # every linear; before: none
    onnx.save(quantized, str(tmp_path / "int4.onnx"))
    session = ort.InferenceSession(str(tmp_path / "int4.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), flat)})[0])
    with torch.no_grad():
        expected = pytree.tree_leaves(gm(*flat))[0]
    assert got.shape == expected.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("shape,perm", [((300, 7), (1, 0)), ((257, 130), (1, 0)), ((5, 3), (1, 0)),
                                        ((4, 6, 5), (2, 0, 1))])
def test_blocked_transpose_copies_the_same_bytes(shape, perm):
    from fxforge.backends.onnx.optimize import transpose_copy

    for dtype in (np.float32, np.uint8, np.float16):
        a = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
        got = transpose_copy(a, perm)
        assert got.flags.c_contiguous and got.dtype == a.dtype
        np.testing.assert_array_equal(got, np.transpose(a, perm))


def test_release_weights_frees_the_folded_weights_without_a_garbage_collection():
    """`backend.release_weights`: the exported IR is cyclic, so dropping it frees nothing until a
    full collection; its weights (here a pre-transposed copy the optimizer folded) go at once."""
    import gc
    import weakref

    import torch

    from fxforge.backends.onnx.backend import export_model, release_weights
    from fxforge.ir.trace import trace

    gm = trace(torch.nn.Linear(16, 8).eval(), (torch.randn(2, 16),))
    model = export_model(gm, (torch.randn(2, 16),))
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    assert tensors
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    gc.disable()
    try:
        release_weights(model)
        assert all(r() is None for r in refs)  # freed by reference counting, no collection ran
    finally:
        gc.enable()
    assert not any(v.const_value is not None for v in model.graph.initializers.values())
