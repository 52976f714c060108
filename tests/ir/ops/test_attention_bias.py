"""fxforge::attention's additive position bias: reference, ONNX lowering and Triton lowering agree
with softmax(Q·Kᵀ·scale + bias) under every mask kind, and calls without a bias are unchanged."""
import math

import pytest
import torch

import fxforge.ir.ops  # noqa: F401  (registers fxforge::attention)
from fxforge.backends.onnx.lowerings import OPSET_VERSION, translation_table

attention = torch.ops.fxforge.attention


def _qkv(lq: int = 5, lk: int = 5, hq: int = 4, hkv: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, hq, lq, 8, generator=g), torch.randn(2, hkv, lk, 8, generator=g),
            torch.randn(2, hkv, lk, 8, generator=g))


def _alibi(heads: int, lk: int) -> torch.Tensor:
    """ALiBi as Bloom builds it: slope_h · j, a (1, H, 1, Lk) bias over key positions."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    return (slopes[:, None] * torch.arange(lk)[None, :]).reshape(1, heads, 1, lk)


def _manual(q, k, v, mask, causal, scale, bias):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale + bias
    lq, lk = scores.shape[-2:]
    if causal:
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~visible, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


def _masks(lq: int, lk: int) -> dict:
    keep = torch.rand(2, 1, lq, lk, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., -1] = True  # no fully hidden row
    return {"none": None, "bool": keep, "additive": torch.zeros(2, 1, lq, lk).masked_fill(~keep, -1e9)}


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("lq,lk,causal", [(5, 5, True), (2, 7, True), (5, 5, False)])
def test_reference_adds_the_bias_before_the_mask(mask_kind, lq, lk, causal):
    q, k, v = _qkv(lq, lk)
    bias, mask = _alibi(4, lk), _masks(lq, lk)[mask_kind]
    got = attention(q, k, v, mask, causal, 0.3, 2, bias)
    torch.testing.assert_close(got, _manual(q, k, v, mask, causal, 0.3, bias), atol=1e-5, rtol=1e-5)


def test_no_bias_is_the_seven_argument_op():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, None, True, None, 2, None), attention(q, k, v, None, True, None, 2))


def test_bias_of_the_wrong_shape_or_dtype_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="bias of shape"):
        attention(q, k, v, None, True, None, 2, torch.zeros(3, 1, 1, 5))
    with pytest.raises(ValueError, match="bias has dtype"):
        attention(q, k, v, None, True, None, 2, torch.zeros(1, 4, 1, 5, dtype=torch.float64))


class _BiasCalls(torch.nn.Module):
    """One graph with the bias under each mask kind, causal square and rectangular: one export."""

    def forward(self, q, k, v, qr, kr, vr, bias, bias_r, keep, additive):
        return (attention(q, k, v, None, True, 0.3, 2, bias),
                attention(q, k, v, keep, False, 0.3, 2, bias),
                attention(q, k, v, additive, True, 0.3, 2, bias),
                attention(qr, kr, vr, None, True, 0.3, 2, bias_r))


def test_onnx_lowering_matches_the_reference():
    import onnxruntime as ort

    q, k, v = _qkv(5, 5)
    qr, kr, vr = _qkv(2, 7)
    masks = _masks(5, 5)
    inputs = (q, k, v, qr, kr, vr, _alibi(4, 5), _alibi(4, 7), masks["bool"], masks["additive"])
    module = _BiasCalls().eval()
    program = torch.onnx.export(module, inputs, dynamo=True, custom_translation_table=translation_table(),
                                opset_version=OPSET_VERSION, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    fused = ("Attention", "MultiHeadAttention", "GroupQueryAttention")  # whichever the default options pick
    assert sum(n.op_type in fused for n in program.model_proto.graph.node) == 4
    for g, e in zip(got, module(*inputs)):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq", [5, 1])  # flash attention, and the one-query decode kernel
def test_triton_lowering_matches_the_reference(lq):
    from fxforge.kernels.flash_attention import attention_triton

    q, k, v = _qkv(lq, 5)
    bias = _alibi(4, 5)
    got = attention_triton(q, k, v, None, True, 0.3, 2, bias)
    torch.testing.assert_close(got, attention(q, k, v, None, True, 0.3, 2, bias), atol=1e-4, rtol=1e-4)
