"""fuse_attention: structure, numerics and match counts on every attention spelling we support.

Architectures: the zoo's tiny-gpt2, tiny-llama, tiny-bert and minilm, and tiny random eager
GPT-2, BERT, Llama (GQA), Mistral, Qwen2, OPT, GPT-NeoX, Phi and ViT from transformers, plus
Llama with attn_implementation="sdpa". Each is traced once (dynamic batch and sequence) and
fused once; the tests then compare the graphs at two sequence lengths, with and without
padding. Hand-written modules cover the spellings HF does not use (scales on Q and K, K
permuted before the transpose, bool masks through where/masked_fill, causal masks from triu
buffers, repeat_interleave) and the subgraphs that must be skipped (tanh softcap, probabilities
reused). Backends: ONNX Runtime at two sequence lengths and Triton under the interpreter.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from graph_text import assert_graph, call_args
from testing_utils import traced_zoo
from torch import nn
from torch.export import Dim

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.graph import summarize
from fxforge.ir.trace import INPUT_NAMES, trace
from fxforge.ir.verify import run_graph
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.passes.attention.fuse_attention import FuseAttention

ATTENTION = torch.ops.fxforge.attention.default
SOFTMAXES = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default}
VOCAB = 128


# --------------------------------------------------------------------------- model builders


def _hf_model(arch: str, impl: str = "eager") -> tuple[nn.Module, int]:
    """(tiny random transformers model in eval mode, number of attention layers)."""
    import transformers as T

    torch.manual_seed(0)
    layers = 2
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    if arch == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                              attn_implementation=impl)
        model = T.GPT2Model(config)
    elif arch == "bert":
        model = T.BertModel(T.BertConfig(**common), add_pooling_layer=False)
    elif arch in ("llama", "mistral", "qwen2"):
        config_class = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[arch]
        model_class = {"llama": T.LlamaModel, "mistral": T.MistralModel, "qwen2": T.Qwen2Model}[arch]
        model = model_class(config_class(num_key_value_heads=2, **common))
    elif arch == "opt":
        config = T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                             attn_implementation=impl)
        model = T.OPTModel(config)
    elif arch == "gpt-neox":
        model = T.GPTNeoXModel(T.GPTNeoXConfig(**common))
    elif arch == "phi":
        model = T.PhiModel(T.PhiConfig(**common))
    elif arch == "vit":
        config = T.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                             image_size=16, patch_size=4, attn_implementation=impl)
        model = T.ViTModel(config, add_pooling_layer=False)
    else:
        raise KeyError(arch)
    model.config.use_cache = False
    return model.eval(), layers


def _text_inputs(batch: int, seq: int, padded: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + seq)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[-1, seq - seq // 3:] = 0  # last row right-padded
    return {"input_ids": ids, "attention_mask": mask}


class Case:
    """One traced architecture: the unfused and fused graphs and how to make its inputs."""

    def __init__(self, name: str, gm: torch.fx.GraphModule, layers: int, make_inputs, example: dict):
        self.name, self.unfused, self.layers, self.make_inputs = name, gm, layers, make_inputs
        names = gm.meta[INPUT_NAMES]
        self.flat = lambda inputs: tuple(inputs[n] for n in names)
        self.report = PipelineReport()
        self.fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=self.flat(example)), report=self.report)

    @property
    def record(self):
        return self.report.records[0]


@functools.lru_cache(maxsize=None)
def _case(name: str) -> Case:
    if name in ZOO:
        zoo, gm = traced_zoo(name)
        layers = {"minilm": 6}.get(name, 2)

        def make(seq: int, padded: bool) -> dict:
            _, kwargs = zoo.make_inputs(batch=2, seq=seq)
            kwargs = dict(kwargs)
            if "attention_mask" in kwargs and not padded:
                kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
            return kwargs

        return Case(name, gm, layers, make, make(16, True))
    arch, _, impl = name.partition(":")
    model, layers = _hf_model(arch, impl or "eager")
    if arch == "vit":
        def make(seq: int, padded: bool) -> dict:  # no sequence axis: vary the batch instead
            return {"pixel_values": torch.randn(2 if seq < 8 else 3, 3, 16, 16, generator=torch.Generator().manual_seed(seq))}

        gm = trace(model, (), make(7, False), dynamic_shapes={"pixel_values": {0: Dim("batch", min=1, max=8)}})
    else:
        def make(seq: int, padded: bool) -> dict:
            return _text_inputs(2, seq, padded)

        dims = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}
        gm = trace(model, (), make(8, True), dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    canonicalize(gm)
    return Case(name, gm, layers, make, make(8, True))


ZOO = ("tiny-gpt2", "tiny-llama", "tiny-bert", "minilm")
HF = ("gpt2", "bert", "llama", "mistral", "qwen2", "opt", "gpt-neox", "phi", "vit", "llama:sdpa")
# Tracing costs 3-10 s a model on the shared CI machine: the extra architectures run as slow tests.
FAST = ("tiny-llama", "llama:sdpa")
ALL = [*FAST, *(pytest.param(a, marks=pytest.mark.slow) for a in (*ZOO, *HF) if a not in FAST)]


def _ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", ALL)
def test_structure_and_match_count(name):
    case = _case(name)
    fused_ops = [n for n in _ops(case.fused) if n.target == ATTENTION]
    assert case.record.sites == case.layers == len(fused_ops)
    assert case.record.skipped == []
    assert not any(n.target in SOFTMAXES for n in _ops(case.fused)), "a softmax survived"
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in _ops(case.fused))
    assert sum(n.target in SOFTMAXES or n.target == torch.ops.aten.scaled_dot_product_attention.default
               for n in _ops(case.unfused)) == case.layers
    if name in ("tiny-llama", "llama", "llama:sdpa", "mistral", "qwen2"):  # GQA: 4 query heads, 2 kv heads
        assert {call_args(n)["num_kv_groups"] for n in fused_ops} == {2}
        assert not any(n.target == torch.ops.aten.expand.default and len(n.args[1]) == 5 for n in _ops(case.fused)), \
            "repeat_kv should not be materialized"


@pytest.mark.parametrize("name", ALL)
def test_numerics_two_lengths_with_and_without_padding(name):
    case = _case(name)
    for seq in (5, 11):
        for padded in (False, True):
            flat = case.flat(case.make_inputs(seq, padded))
            for ref, got in zip(run_graph(case.unfused, flat), run_graph(case.fused, flat)):
                assert got.shape == ref.shape
                err = (got - ref).abs().max().item()
                assert err <= 1e-5, f"{name} seq={seq} padded={padded}: max abs error {err}"


def test_padding_masks_are_kept():
    llama = _case("tiny-llama")
    masks = [call_args(n)["attn_mask"] for n in _ops(llama.fused) if n.target == ATTENTION]
    assert all(isinstance(m, torch.fx.Node) for m in masks)  # padding + causal: the model's own mask feeds the op
    assert all(m.meta["val"].dtype == torch.float32 for m in masks)


# --------------------------------------------------------------------------- hand-written spellings


class Attention(nn.Module):
    """Self-attention with switchable spellings of the scale, the mask and the K transpose."""

    def __init__(self, spelling: str, heads: int = 4, kv_heads: int = 4, dim: int = 32, seq: int = 8):
        super().__init__()
        self.spelling, self.heads, self.kv_heads, self.head_dim = spelling, heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("causal_bias", torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1))
        self.register_buffer("tril", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d, s_ = self.head_dim, self.spelling
        q = self.q(x).view(b, s, self.heads, d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, d).unbind(2)
        v = v.transpose(1, 2)
        if s_ == "scale_on_qk":
            q = q / d ** 0.25
            kt = (k.transpose(1, 2) / d ** 0.25).transpose(-1, -2)
        elif s_ == "k_permuted":  # (B, S, H, D) -> (B, H, D, S) in one permute
            kt = k.permute(0, 2, 3, 1)
        else:
            kt = k.transpose(1, 2).transpose(2, 3)
        if s_ == "repeat_interleave":
            groups = self.heads // self.kv_heads
            kt = kt.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = q @ kt
        if s_ not in ("scale_on_qk",):
            scores = scores * (1.0 / math.sqrt(d)) if s_ != "divide" else scores / math.sqrt(d)
        if s_ == "triu_buffer":
            scores = scores + self.causal_bias[:s, :s]
        elif s_ == "tril_where":
            scores = torch.where(self.tril[:s, :s], scores, float("-inf"))
        elif s_ == "arange_masked_fill":
            pos = torch.arange(s)
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        elif s_ == "where_finite":  # a finite fill becomes an additive mask (0 / -1e4)
            scores = torch.where(self.tril[:s, :s], scores, -1e4)
        elif s_ == "tril_offset":  # sees one key ahead: not causal, the mask must stay
            scores = torch.where(torch.ones(s, s, dtype=torch.bool).tril(1), scores, float("-inf"))
        elif s_ == "softcap":
            scores = torch.tanh(scores / 5.0) * 5.0
        probs = scores.softmax(-2 if s_ == "softmax_query_axis" else -1)
        out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        if s_ == "probs_returned":
            return self.o(out), probs
        return self.o(out)


@functools.lru_cache(maxsize=None)
def _handwritten(spelling: str, kv_heads: int = 4):
    torch.manual_seed(0)
    model = Attention(spelling, kv_heads=kv_heads).eval()
    x = torch.randn(2, 8, 32)
    gm = trace(model, (x,), {}, dynamic_shapes=None)
    canonicalize(gm)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(x,)), report=report)
    return gm, fused, report.records[0], x


@pytest.mark.parametrize("spelling,causal,masked", [
    ("multiply", False, False), ("divide", False, False), ("scale_on_qk", False, False),
    ("k_permuted", False, False), ("triu_buffer", True, False), ("tril_where", True, False),
    ("arange_masked_fill", True, False), ("tril_offset", False, True), ("where_finite", False, True),
])
def test_handwritten_spellings(spelling, causal, masked):
    gm, fused, record, x = _handwritten(spelling)
    (op,) = [n for n in _ops(fused) if n.target == ATTENTION]
    assert record.sites == 1 and record.skipped == []
    args = call_args(op)
    assert args["is_causal"] is causal  # is_causal only where the mask is proven to be the causal triangle
    assert (args["attn_mask"] is not None) is masked  # ... and then the mask is dropped
    assert args["scale"] == pytest.approx(1 / math.sqrt(8))
    assert not any(n.target in SOFTMAXES for n in _ops(fused))
    torch.testing.assert_close(run_graph(fused, (x,))[0], run_graph(gm, (x,))[0], atol=1e-5, rtol=1e-5)


def test_causal_buffer_attention_before_and_after():
    """The whole subgraph from the scores matmul to the value matmul becomes one op; the triu
    buffer is proven to be the causal triangle, so it becomes is_causal and leaves the graph."""
    gm, fused, _, _ = _handwritten("triu_buffer")
    projections = """
        x = input()
        linear = aten.linear(x, @q.weight, @q.bias)
        view = aten.view(linear, [2, 8, 4, 8])
        transpose = aten.transpose.int(view, 1, 2)
        linear_1 = aten.linear(x, @kv.weight, @kv.bias)
        view_1 = aten.view(linear_1, [2, 8, 2, 4, 8])
        unbind = aten.unbind.int(view_1, 2)
        getitem = getitem(unbind, 0)
        getitem_1 = getitem(unbind, 1)
        transpose_1 = aten.transpose.int(getitem_1, 1, 2)
        transpose_2 = aten.transpose.int(getitem, 1, 2)
    """
    output = """
        reshape = aten.reshape(transpose_4, [2, 8, -1])
        linear_2 = aten.linear(reshape, @o.weight, @o.bias)
        return (linear_2,)
    """
    assert_graph(gm, projections + """
        transpose_3 = aten.transpose.int(transpose_2, 2, 3)
        matmul = aten.matmul(transpose, transpose_3)
        mul = aten.mul.Tensor(matmul, 0.35355339059327373)
        alias = aten.alias(@causal_bias)
        add = aten.add.Tensor(mul, alias)
        softmax = aten.softmax.int(add, -1)
        matmul_1 = aten.matmul(softmax, transpose_1)
        transpose_4 = aten.transpose.int(matmul_1, 1, 2)
    """ + output)
    assert_graph(fused, projections + """
        attention_default = fxforge.attention(transpose, transpose_2, transpose_1, None, True, 0.35355339059327373, 1)
        transpose_4 = aten.transpose.int(attention_default, 1, 2)
    """ + output)


def test_grouped_query_via_repeat_interleave():
    gm, fused, record, x = _handwritten("repeat_interleave", kv_heads=2)
    (op,) = [n for n in _ops(fused) if n.target == ATTENTION]
    assert record.sites == 1 and call_args(op)["num_kv_groups"] == 2
    assert call_args(op)["k"].meta["val"].shape[1] == 2  # k reaches the op with its 2 kv heads, not repeated
    assert not any(n.target == torch.ops.aten.repeat_interleave.self_int for n in _ops(fused))
    torch.testing.assert_close(run_graph(fused, (x,))[0], run_graph(gm, (x,))[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spelling,reason", [
    ("softcap", "tanh"),
    ("probs_returned", "also used"),
    # the softmax row's own reason is carried into the skip reason
    ("softmax_query_axis", "not the key axis"),
])
def test_unprovable_attention_is_skipped_whole(spelling, reason):
    gm, fused, record, x = _handwritten(spelling)
    assert record.sites == 0
    assert len(record.skipped) == 1 and reason in record.skipped[0][1]
    # never half-rewritten: the graph is the one we started from
    assert summarize(fused).ops == summarize(gm).ops


class TwoAttentions(nn.Module):
    """One fusable attention and one with a softcap: only the first is rewritten."""

    def __init__(self):
        super().__init__()
        self.plain = Attention("multiply")
        self.capped = Attention("softcap")

    def forward(self, x):
        return self.capped(self.plain(x))


def test_mixed_module_fuses_one_and_reports_the_other():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    gm = trace(TwoAttentions().eval(), (x,), {}, dynamic_shapes=None)
    canonicalize(gm)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(x,)), report=report)
    record = report.records[0]
    assert record.sites == 1
    assert [where for where, _ in record.skipped] == ["capped"]
    assert sum(n.target in SOFTMAXES for n in _ops(fused)) == 1
    torch.testing.assert_close(run_graph(fused, (x,))[0], run_graph(gm, (x,))[0], atol=1e-5, rtol=1e-5)


class SdpaGqa(nn.Module):
    """F.scaled_dot_product_attention with is_causal and enable_gqa (2 kv heads for 4 query heads)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)


def test_sdpa_call_with_causal_and_gqa():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    gm = trace(SdpaGqa(), (q, k, v), {}, dynamic_shapes=None)
    canonicalize(gm)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(q, k, v)), report=report)
    (op,) = [n for n in _ops(fused) if n.target == ATTENTION]
    assert report.records[0].sites == 1
    args = call_args(op)
    assert (args["attn_mask"], args["is_causal"], args["scale"], args["num_kv_groups"], args["bias"]) == \
        (None, True, 0.2, 2, None)
    torch.testing.assert_close(run_graph(fused, (q, k, v))[0], run_graph(gm, (q, k, v))[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- run-time mask errors


class MaskedAttention(nn.Module):
    """softmax(q kᵀ / √d + mask) v with the mask as a model input."""

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask).softmax(-1) @ v


@pytest.fixture(scope="module")
def masked_fused():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4)
    gm = trace(MaskedAttention(), (q, k, v, mask), {}, dynamic_shapes=None)
    canonicalize(gm)
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(q, k, v, mask)))
    return fused, (q, k, v)


def test_wrong_mask_shape_at_run_time_gets_the_ops_error(masked_fused):
    fused, qkv = masked_fused
    assert sum(n.target == ATTENTION for n in _ops(fused)) == 1
    with pytest.raises(ValueError, match="does not broadcast"):
        fused(*qkv, torch.zeros(1, 1, 4, 3))


def test_wrong_mask_dtype_at_run_time_gets_the_ops_error(masked_fused):
    fused, qkv = masked_fused
    with pytest.raises(ValueError, match="dtype"):
        fused(*qkv, torch.zeros(1, 1, 4, 4, dtype=torch.float64))


# --------------------------------------------------------------------------- backends and composition


def _compare_on_backend(case: Case, backend: str, seqs, **options):
    from fxforge.api import CompiledModel

    compiled = CompiledModel(case.fused, backend, example_inputs=case.flat(case.make_inputs(seqs[0], True)),
                             backend_options=options)
    for seq in seqs:
        flat = case.flat(case.make_inputs(seq, True))
        ref = run_graph(case.unfused, flat)
        got = compiled.run_flat(*flat)
        got = got if isinstance(got, (tuple, list)) else (got,)
        for r, g in zip(ref, got):
            torch.testing.assert_close(torch.as_tensor(g), r, atol=2e-4, rtol=2e-4)


@pytest.mark.slow  # ONNX export takes 10-30 s on the shared machine; the quantize test below exports too
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_fused_models_on_onnx_backend_dynamic_length(name):
    _compare_on_backend(_case(name), "onnx", seqs=(6, 13))


def test_fused_model_on_triton_backend():
    _compare_on_backend(_case("tiny-llama"), "triton", seqs=(5,))


@pytest.mark.slow  # the ONNX export alone takes 20-40 s on the shared machine
def test_quantize_then_fuse_attention_then_onnx():
    """Composition on the ONNX backend at two sequence lengths (GQA + int8 MatMulNBits)."""
    from fxforge.api import CompiledModel
    from fxforge.passes.quantize import Quantize

    case = _case("tiny-llama")
    ctx = PassContext(example_inputs=case.flat(case.make_inputs(8, True)))
    quantized = run_pass(Quantize(bits=8, group_size=32), copy.deepcopy(case.unfused), ctx)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), quantized, ctx, report=report)
    ops = summarize(fused).ops
    assert report.records[0].sites == 2 and ops["fxforge.attention"] == 2 and ops["fxforge.linear_wq"] > 0
    assert ops["aten.softmax"] == 0
    # ORT's MatMulNBits rounds differently from the int8 reference, so compare by cosine and a
    # relative bound; an attention mistake (a wrong mask, a wrong group) moves outputs by O(1).
    compiled = CompiledModel(fused, "onnx", example_inputs=ctx.example_inputs, verify=False)
    for seq in (6, 12):
        flat = case.flat(case.make_inputs(seq, True))
        ref = run_graph(fused, flat)[0]
        got = torch.as_tensor(compiled.run_flat(*flat)[0])
        assert got.shape == ref.shape
        assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9999
        assert (got - ref).norm() / ref.norm() < 0.02
