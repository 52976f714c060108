"""bf16/fp16 attention written as transformers writes it: the softmax computed in float32 and the
probabilities cast back to the scores' dtype before P·V. fuse_attention fuses it (the op
computes its softmax in float32 and returns q's dtype), add_kv_cache caches it fused or not, and
a float32 softmax whose probabilities are *not* cast back is still refused with its reason."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from graph_text import call_args
from torch import nn

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import trace
from fxforge.ir.verify import Tolerance, compare_outputs, low_precision_tolerance, run_graph
from fxforge.models.zoo import get_model
from fxforge.passes.attention.fuse_attention import FuseAttention
from fxforge.passes.attention.rules import probabilities
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.runtime.meta_keys import KV_META

aten = torch.ops.aten
ATTENTION = torch.ops.fxforge.attention.default
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
DTYPES = [torch.bfloat16, torch.float16]


class CastBackAttention(nn.Module):
    """Causal self-attention, softmax in float32; `cast_back=False` keeps P·V in float32 too."""

    def __init__(self, cast_back: bool = True, heads: int = 4, dim: int = 32, seq: int = 8):
        super().__init__()
        self.cast_back, self.heads, self.head_dim = cast_back, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).transpose(1, 3).unbind(2)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.causal[:s, :s].to(q.dtype)
        probs = scores.softmax(-1, dtype=torch.float32)
        if self.cast_back:
            out = probs.to(q.dtype) @ v
        else:  # the probabilities weight float32 values: not the op's dtype contract
            out = (probs @ v.float()).to(q.dtype)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


@functools.lru_cache(maxsize=None)
def _fused(dtype: torch.dtype, cast_back: bool = True):
    torch.manual_seed(0)
    model = CastBackAttention(cast_back).to(dtype).eval()
    x = torch.randn(2, 8, 32, dtype=dtype)
    gm = trace(model, (x,), {}, dynamic_shapes=None)
    canonicalize(gm)
    report = PipelineReport()
    fused = run_pass(FuseAttention(), gm, PassContext(example_inputs=(x,)), report=report)
    return model, gm, fused, report.records[0], x


def _ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_softmax_cast_back_is_one_attention_op(dtype):
    _, gm, fused, record, _ = _fused(dtype)
    (softmax,) = [n for n in _ops(gm) if n.target in SOFTMAXES]
    assert softmax.meta["val"].dtype == torch.float32 and softmax.args[0].meta["val"].dtype == dtype
    cast = probabilities(softmax)
    assert cast is not softmax and cast.meta["val"].dtype == dtype  # the anchor is the cast back
    (op,) = [n for n in _ops(fused) if n.target == ATTENTION]
    assert record.sites == 1 and record.skipped == []
    assert call_args(op)["is_causal"] is True and call_args(op)["attn_mask"] is None
    assert op.meta["val"].dtype == dtype
    assert not any(n.target in SOFTMAXES for n in _ops(fused))
    # no float32 tensor is left between the projections: the softmax and both casts went with it
    assert not any(n.meta["val"].dtype == torch.float32 for n in _ops(fused) if "val" in n.meta
                   and isinstance(n.meta["val"], torch.Tensor))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_op_computes_the_eager_graph_within_the_dtypes_rounding(dtype):
    model, gm, fused, record, x = _fused(dtype)
    for seed in (1, 2):  # traced with static shapes: fresh inputs of the traced shape
        inputs = (torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dtype),)
        got, eager = run_graph(fused, inputs), run_graph(gm, inputs)
        tolerance = low_precision_tolerance(Tolerance(), dtype)
        assert compare_outputs(eager, got, tolerance).ok
        # and both are the float32 computation of the same weights, to the dtype's rounding
        reference = copy.deepcopy(model).float()(inputs[0].float())
        assert compare_outputs([reference], [got[0].float()], tolerance).ok
    assert record.verified_against == "graph before" and record.verified_shapes  # the pass was checked


def test_a_wrong_fusion_would_fail_that_tolerance():
    """The widened check still rejects what a fusion bug does: dropping the causal mask."""
    model, gm, fused, _, x = _fused(torch.bfloat16)
    wrong = copy.deepcopy(fused)
    (op,) = [n for n in _ops(wrong) if n.target == ATTENTION]
    op.args = (*op.args[:4], False, *op.args[5:])
    wrong.recompile()
    assert not compare_outputs(run_graph(gm, (x,)), run_graph(wrong, (x,)),
                               low_precision_tolerance(Tolerance(), torch.bfloat16)).ok


def test_float32_probabilities_not_cast_back_are_skipped_with_the_reason():
    _, gm, fused, record, _ = _fused(torch.bfloat16, cast_back=False)
    assert record.sites == 0 and len(record.skipped) == 1
    assert "computes in torch.float32, not the scores' torch.bfloat16" in record.skipped[0][1]
    assert [n.target for n in _ops(fused)] == [n.target for n in _ops(gm)]


@functools.lru_cache(maxsize=None)
def _low_precision_llama(dtype: torch.dtype):
    zoo = get_model("tiny-llama")
    model = copy.deepcopy(zoo.model).to(dtype).eval()
    ids = zoo.kwargs["input_ids"]
    gm = trace(model, (), {"input_ids": ids})
    canonicalize(gm)
    return gm, ids


# bf16 fused runs end to end (eager and ONNX) in tests/backends/test_low_precision.py
@pytest.mark.parametrize("dtype,fuse", [(torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp16-fused", "bf16-eager"])
def test_add_kv_cache_on_a_low_precision_llama(dtype, fuse):
    gm, ids = _low_precision_llama(dtype)
    ctx = PassContext(example_inputs=(ids,))
    report = PipelineReport()
    if fuse:
        gm = run_pass(FuseAttention(), gm, ctx, report=report)
        assert report.records[0].sites == 2 and report.records[0].skipped == []
    cached = run_pass(AddKvCache(), gm, ctx, report=report)  # verifies prefill + a cached step
    layout = cached.meta[KV_META]
    assert layout.num_layers == 2 and layout.dtype == str(dtype).removeprefix("torch.")
    assert layout.attention == ("fused" if fuse else "eager")
    assert report.records[-1].sites == 2
