"""quantize(method=rtn): quantizer math, structure, numerics and match counts on tiny-llama (GQA)
and tiny-gpt2 (Conv1D), per-IC grouping, ONNX export, and the bad-input errors."""
import copy

import onnx
import pytest
import torch
from testing_utils import traced_zoo

from fxforge.backends.onnx.backend import OnnxRunner, export_onnx
from fxforge.errors import PassError
from fxforge.ir.graph import get_attr, linear_sites, summarize
from fxforge.ir.ops.linear_wq import dequantize_wq
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass
from fxforge.passes.quantize import Quantize
from fxforge.passes.quantize.common import relative_error
from fxforge.passes.quantize.rtn import QuantSpec, quantize_weight_rtn

WQ = torch.ops.fxforge.linear_wq.default
WQ_IC = torch.ops.fxforge.linear_wq_ic.default


@pytest.fixture(scope="module")
def gpt2():
    zoo, gm = traced_zoo("tiny-gpt2")
    return gm, PassContext(example_inputs=tuple(zoo.kwargs.values()))


def _op_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


# --------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_at_most_half_a_step(bits, sym):
    w = torch.randn(8, 64)
    qm = quantize_weight_rtn(w, QuantSpec(bits=bits, group_size=16, sym=sym))
    assert qm.codes.shape == (8, 64) and qm.scales.shape == (8, 4) and qm.zeros.shape == (8, 4)
    assert int(qm.codes.max()) < 1 << bits
    step = qm.scales.repeat_interleave(16, dim=1)
    # sym clamps the most negative code, so its error can reach a full step at the group minimum
    assert ((qm.dequantize() - w).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all()
    if sym:
        assert (qm.zeros == 1 << (bits - 1)).all()


def test_more_bits_less_error_and_groups_help():
    w = torch.randn(16, 128)
    errors = [relative_error(w, quantize_weight_rtn(w, QuantSpec(b, 128)).dequantize()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    grouped = relative_error(w, quantize_weight_rtn(w, QuantSpec(4, 16)).dequantize())
    assert grouped < errors[2]


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_worse_per_group_and_better_overall(sym):
    w = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.02
    spec = QuantSpec(4, 64, sym)
    plain = quantize_weight_rtn(w, spec).dequantize()
    searched_qm = quantize_weight_rtn(w, spec, clip_search=True)
    searched = searched_qm.dequantize()
    per_group = lambda d: (d - w).square().reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) + 1e-12).all()  # the full range (clip 1) is a candidate
    assert relative_error(w, searched) < 0.97 * relative_error(w, plain)
    assert int(searched_qm.codes.max()) <= spec.qmax and searched_qm.zeros.dtype == torch.uint8


# --------------------------------------------------------------------------- the pass on zoo models


def test_llama_structure_numerics_and_count(llama):
    gm, ctx = llama
    q = run_pass(Quantize(bits=4, group_size=32), gm, ctx)  # run_pass verifies the declared tolerance
    assert len(_op_nodes(q, WQ)) == 15  # 2 layers x (q, k, v, o, gate, up, down) + the LM head (default)
    ops = summarize(q).ops
    assert ops["aten.linear"] == 0
    names = dict(q.named_parameters())
    assert "model.layers.0.self_attn.k_proj.weight" not in names
    k_proj = [n for n in _op_nodes(q, WQ) if n.args[1].target.startswith("model.layers.0.self_attn.k_proj")][0]
    packed = get_attr(q, k_proj.args[1].target)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)  # GQA: 2 kv heads x 16, two codes a byte
    assert k_proj.args[5:] == (4, 32)
    original = get_attr(gm, "model.layers.0.self_attn.k_proj.weight")
    scales, zeros = get_attr(q, k_proj.args[2].target), get_attr(q, k_proj.args[3].target)
    expected = quantize_weight_rtn(original, QuantSpec(4, 32), clip_search=True).dequantize()  # the default
    torch.testing.assert_close(dequantize_wq(packed, scales, zeros, 4, 32, 64), expected)
    assert summarize(q).total_param_bytes < summarize(gm).total_param_bytes


def test_gpt2_conv1d_layers_quantize(gpt2):
    gm, ctx = gpt2
    q = run_pass(Quantize(bits=8, group_size=-1, sym=True), gm, ctx)
    nodes = _op_nodes(q, WQ)
    assert len(nodes) == 9  # 2 blocks x 4 Conv1D + the LM head, tied to wte (which stays float, stored once)
    embeddings = [n for n in q.graph.nodes if n.target == torch.ops.aten.embedding.default]  # wte, wpe
    assert len(embeddings) == 2 and all(get_attr(q, n.args[0].target).dtype == torch.float32 for n in embeddings)
    c_attn = [n for n in nodes if n.args[1].target.startswith("transformer.h.0.attn.c_attn")][0]
    assert get_attr(q, c_attn.args[1].target).shape == (192, 64)  # Conv1D's (in, out) weight, now (out, in)
    assert c_attn.args[6] == 64  # per channel: one group of all 64 inputs
    ref, got = run_graph(gm, ctx.example_inputs)[0], run_graph(q, ctx.example_inputs)[0]
    assert relative_error(ref, got) < 0.01


def test_per_input_channel_grouping(llama):
    gm, ctx = llama
    q = run_pass(Quantize(bits=4, group_size=16, group_axis="out"), gm, ctx)
    nodes = _op_nodes(q, WQ_IC)
    assert len(nodes) == 15 and not _op_nodes(q, WQ)
    down = [n for n in nodes if "layers.1.mlp.down_proj" in n.args[1].target][0]
    assert get_attr(q, down.args[1].target).shape == (128, 32)  # (in, out/2): Wᵀ packed
    assert get_attr(q, down.args[2].target).shape == (128, 4)   # 64 outputs / 16 per group
    original = get_attr(gm, "model.layers.1.mlp.down_proj.weight")
    ref = quantize_weight_rtn(original.T, QuantSpec(4, 16), clip_search=True).dequantize().T
    x = torch.randn(3, 128)
    got = torch.ops.fxforge.linear_wq_ic(x, *(get_attr(q, a.target) for a in down.args[1:4]), None, 4, 16)
    torch.testing.assert_close(got, x @ ref.T)


def test_targets_exclude_and_lm_head(llama):
    gm, ctx = llama
    mlp = Quantize(bits=8, group_size=-1, targets=("*.mlp.*",), exclude=("layers.1.mlp.down_proj",)).run(
        copy.deepcopy(gm), ctx)
    assert mlp.sites == 5
    with_head = run_pass(Quantize(bits=8, group_size=-1, include_lm_head=True), gm, ctx)
    assert len(_op_nodes(with_head, WQ)) == 15 and summarize(with_head).ops["aten.linear"] == 0


def test_three_bit_codes_in_four_bit_containers(llama):
    gm, ctx = llama
    q = run_pass(Quantize(bits=3, group_size=32), gm, ctx)
    node = _op_nodes(q, WQ)[0]
    assert node.args[5] == 4
    codes = get_attr(q, node.args[1].target)
    assert int((codes & 0xF).max()) < 8 and int((codes >> 4).max()) < 8


# --------------------------------------------------------------------------- ONNX export


@pytest.mark.slow  # each export takes 15-40 s on the shared CI machine
@pytest.mark.parametrize("model,count", [("gpt2", 9), ("llama", 15)])
def test_exports_to_onnx(request, tmp_path, model, count):
    gm, ctx = request.getfixturevalue(model)
    q = run_pass(Quantize(bits=4, group_size=32), gm, ctx)
    path = export_onnx(q, ctx.example_inputs, tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == count
    # the file holds the packed codes: half a byte per weight
    packed = sum(len(i.raw_data) for i in proto.graph.initializer if i.name.endswith("qweight"))
    assert packed == sum(s.in_features * s.out_features for s in linear_sites(gm, include_lm_head=True)) // 2
    got = OnnxRunner(path, threads=1)(*ctx.example_inputs)[0]
    ref = run_graph(q, ctx.example_inputs)[0]
    # MatMulNBits' accuracy_level 4 quantizes activations to int8 per block: ~0.5% drift
    assert relative_error(ref, got) < 0.03


class _IcLinear(torch.nn.Module):
    def __init__(self, weight, bits, group_size):
        super().__init__()
        qm = quantize_weight_rtn(weight.T, QuantSpec(bits, group_size))
        from fxforge.ir.ops.linear_wq import pack_bits

        self.register_buffer("qweight", pack_bits(qm.codes, 4 if bits <= 4 else 8))
        self.register_buffer("scales", qm.scales)
        self.register_buffer("zeros", qm.zeros)
        self.bias = torch.nn.Parameter(torch.randn(weight.shape[0]))
        self.bits, self.group_size, self.expected = (4 if bits <= 4 else 8), group_size, qm.dequantize().T

    def forward(self, x):
        return torch.ops.fxforge.linear_wq_ic(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                              self.group_size)


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_wq_ic_onnx_lowering_matches_reference(tmp_path, bits):
    from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table
    import onnxruntime as ort

    module = _IcLinear(torch.randn(48, 32), bits, 16)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(module(x), x @ module.expected.T + module.bias)  # the op's reference
    program = torch.onnx.export(module, (x,), dynamo=True, custom_translation_table=translation_table(),
                                opset_version=OPSET_VERSION, optimize=False, verbose=False)
    program.save(str(tmp_path / "ic.onnx"))
    session = ort.InferenceSession(str(tmp_path / "ic.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_group_size_not_dividing_a_layer_names_it(llama):
    gm, ctx = llama
    before = copy.deepcopy(gm.state_dict())
    with pytest.raises(PassError, match=r"model.layers.0.self_attn.q_proj.*in_features=64.*group_size=48"):
        run_pass(Quantize(bits=4, group_size=48), gm, ctx)
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_layer_narrower_than_a_group_gets_one_group_per_channel(llama):
    """Over the whole model, a layer narrower than group_size (tiny-llama's 64 inputs under 128)
    is quantized with one group per channel and named in the notes; named in targets, it fails."""
    from fxforge.passes.pipeline import PipelineReport

    gm, ctx = llama
    report = PipelineReport()
    out = run_pass(Quantize(bits=4, group_size=128, clip_search=False), gm, ctx, report=report)  # verified
    record = report.records[-1]
    sites = linear_sites(gm, include_lm_head=True)
    assert any(s.in_features >= 128 for s in sites) and record.sites == len(sites)
    assert sorted(record.notes["one_group_per_channel"]) == sorted(
        s.module_path for s in sites if s.in_features < 128)
    groups = {n.args[0].name: n.args[-1] for n in out.graph.nodes
              if n.op == "call_function" and "linear_wq" in str(n.target)}
    assert set(groups.values()) == {64, 128}  # q_proj: its 64 inputs are one group; down_proj: 128
    with pytest.raises(PassError, match=r"in_features=64.*group_size=128"):
        run_pass(Quantize(bits=4, group_size=128, targets=("model.layers.0.self_attn.q_proj",)), gm, ctx)


def test_odd_packed_axis_is_refused():
    from fxforge.passes.quantize.common import check_packable
    from fxforge.ir.graph import LinearSite

    site = LinearSite(node=None, weight_name="fc.weight", bias_name=None, in_features=5, out_features=4,
                      module_path="fc")
    with pytest.raises(PassError, match=r"'fc'.*bits=8"):
        check_packable("quantize", site, QuantSpec(4, 5), "in")


@pytest.mark.parametrize("options,match", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(group_size=0), "group_size=0"),
    (dict(group_axis="rows"), "group_axis"), (dict(method="hqq"), "method"),
])
def test_bad_options_fail_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        Quantize(**options)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibration_methods_need_data(llama, method):
    gm, ctx = llama
    with pytest.raises(PassError, match=rf"'{method}'\) needs calibration data.*model.layers.0.self_attn.q_proj"):
        run_pass(Quantize(bits=4, group_size=32, method=method), gm, ctx)


def test_pipeline_string_parses():
    from fxforge.passes.pipeline import Pipeline

    (p,) = Pipeline("quantize(bits=3,group_size=-1,sym=True,group_axis=out,method=rtn)").passes
    assert p == Quantize(bits=3, group_size=-1, sym=True, group_axis="out")


# --------------------------------------------------------------------------- triton backend


def test_triton_backend_runs_the_quantized_llama(llama):
    from fxforge.backends.triton import prepare

    gm, ctx = llama
    q = run_pass(Quantize(bits=4, group_size=32), gm, ctx)
    lowered = prepare(q)  # linear_wq -> the wq_gemm kernels, under TRITON_INTERPRET=1 on CPU
    assert not _op_nodes(lowered, WQ)
    ref, got = run_graph(q, ctx.example_inputs)[0], run_graph(lowered, ctx.example_inputs)[0]
    assert relative_error(ref, got) < 1e-2  # the kernel's tl.dot runs in a 16-bit type


def test_triton_backend_names_ops_without_kernels(llama):
    from fxforge.backends.triton import prepare
    from fxforge.errors import MissingLoweringError

    gm, ctx = llama
    q = run_pass(Quantize(bits=4, group_size=16, group_axis="out", targets=("layers.0.mlp.up_proj",)), gm, ctx)
    with pytest.raises(MissingLoweringError, match="triton' has no lowering for op 'fxforge::linear_wq_ic'"):
        prepare(q)
