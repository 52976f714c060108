"""add_kv_cache after quantize_dynamic: per-token W8A8 caches exactly, per-tensor is refused."""
import pytest
import torch

from fxforge.ir.ops import get_op

from fxforge.errors import PassError
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import Pipeline
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.meta_keys import KV_META
from runtime.fused_code_lm import fused_graph


@pytest.fixture(scope="module")
def graph():
    gm, ids = fused_graph(fused=True)
    return gm, ids[:, :10]


def test_per_token_w8a8_caches_exactly(graph):
    gm, ids = graph
    w8a8, report = Pipeline('quantize_dynamic(act_scale="token")').run(gm, PassContext(example_inputs=(ids,)))
    assert report.records[0].sites > 0
    cached, report = Pipeline("add_kv_cache").run(w8a8, PassContext(example_inputs=(ids,)))
    assert [r.name for r in report.records] == ["add_kv_cache"]  # its exact check passed: not rolled back
    # a 4-token prefill then the rest token by token gives the uncached W8A8 graph's logits
    meta = cached.meta[KV_META]
    out = cached(*cached_inputs(meta, ids[:, :4], 0, empty_past(meta, ids.shape[0], torch.float32)))
    logits, past = [out[0]], [out[i] for pair in meta.present for i in pair]
    for t in range(4, ids.shape[1]):
        out = cached(*cached_inputs(meta, ids[:, t:t + 1], t, past))
        logits.append(out[0])
        past = [out[i] for pair in meta.present for i in pair]
    full = w8a8(ids)
    full = full[0] if isinstance(full, (tuple, list)) else full
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_per_tensor_w8a8_is_refused_with_the_fix(graph):
    gm, ids = graph
    with pytest.raises(PassError, match=r'one scale per tensor.*quantize_dynamic\(act_scale="token"\)'):
        Pipeline("quantize_dynamic,add_kv_cache").run(gm, PassContext(example_inputs=(ids,)))


def test_unrounded_is_the_continuous_surrogate_only_inside():
    # add_kv_cache is checked on W8A8 graphs with this surrogate: same codes, scales and bias, no rounding.
    from fxforge.ir.activation_rounding import unrounded

    linear_w8a8 = get_op("linear_w8a8").overload  # what graphs call, and what unrounded() intercepts

    x, w8 = torch.randn(3, 16), torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scale, bias = torch.rand(8) * 0.01 + 1e-3, torch.randn(8)
    quantized = linear_w8a8(x, w8, scale, bias, "token")
    with unrounded(["linear_w8a8"]):
        surrogate = linear_w8a8(x, w8, scale, bias, "token")
    torch.testing.assert_close(surrogate, x @ (w8.float() * scale[:, None]).T + bias)
    assert not torch.equal(surrogate, quantized)  # the rounding is really skipped inside...
    assert torch.equal(linear_w8a8(x, w8, scale, bias, "token"), quantized)  # ...and only there


def test_per_token_w8a8_with_attention_mask_caches_after_an_earlier_pass(graph):
    # add_kv_cache's check reuses the previous pass's outputs of the graph before; those were
    # computed with activations rounded and must not stand in for the unrounded proof
    gm, ids = graph
    Pipeline("quantize_dynamic(include_lm_head=True,act_scale=token),add_kv_cache(attention_mask=True)").run(
        gm, PassContext(example_inputs=(ids,)))
