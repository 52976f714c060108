"""fxforge::attention's reference against a hand-written softmax(Q·Kᵀ·s + mask)·V."""
import math

import pytest
import torch

from fxforge.ir.ops.attention import causal_visibility

attention = torch.ops.fxforge.attention


def naive_attention(q, k, v, mask=None, visible=None, scale=None):
    """softmax(q·kᵀ·scale + mask)·v in float64, with K/V repeated per group by hand."""
    groups = q.shape[1] // k.shape[1]
    k = torch.cat([k[:, h : h + 1].expand(-1, groups, -1, -1) for h in range(k.shape[1])], dim=1)
    v = torch.cat([v[:, h : h + 1].expand(-1, groups, -1, -1) for h in range(v.shape[1])], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return (probs @ v.double()).to(q.dtype)


def qkv(b=2, hq=4, hkv=4, lq=5, lk=5, d=8, dv=None, dtype=torch.float32):
    return (
        torch.randn(b, hq, lq, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
        torch.randn(b, hkv, lk, dv or d, dtype=dtype),
    )


@pytest.mark.parametrize("scale", [None, 0.3])
def test_plain_matches_naive(scale):
    q, k, v = qkv(dv=6)
    out = attention(q, k, v, None, False, scale, 1)
    assert out.shape == (2, 4, 5, 6)
    torch.testing.assert_close(out, naive_attention(q, k, v, scale=scale), atol=1e-5, rtol=1e-5)


def test_square_causal_is_top_left():
    q, k, v = qkv(lq=6, lk=6)
    out = attention(q, k, v, None, True, None, 1)
    visible = torch.ones(6, 6).tril().bool()  # query i sees keys j <= i
    torch.testing.assert_close(out, naive_attention(q, k, v, visible=visible), atol=1e-5, rtol=1e-5)
    # Row 0 sees only key 0, so its output is v[..., 0, :] exactly.
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-6)


def test_decode_causal_is_bottom_right():
    q, k, v = qkv(lq=3, lk=7)
    out = attention(q, k, v, None, True, None, 1)
    visible = causal_visibility(3, 7)
    assert visible.tolist()[0] == [True] * 5 + [False] * 2  # first new query sees the 4 cached + itself
    assert visible[-1].all()
    torch.testing.assert_close(out, naive_attention(q, k, v, visible=visible), atol=1e-5, rtol=1e-5)
    # One query with causal sees every key: same as no mask at all.
    q1 = q[:, :, -1:]
    torch.testing.assert_close(attention(q1, k, v, None, True, None, 1), attention(q1, k, v, None, False, None, 1))


def test_more_queries_than_keys_gives_zero_rows():
    q, k, v = qkv(lq=5, lk=3)
    out = attention(q, k, v, None, True, None, 1)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))  # rows 0, 1 see no key
    torch.testing.assert_close(out, naive_attention(q, k, v, visible=causal_visibility(5, 3)), atol=1e-5, rtol=1e-5)


def test_bool_and_additive_masks():
    q, k, v = qkv(lq=4, lk=6)
    bool_mask = torch.rand(2, 1, 4, 6) > 0.3
    bool_mask[..., 0] = True
    out = attention(q, k, v, bool_mask, False, None, 1)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask=bool_mask), atol=1e-5, rtol=1e-5)
    additive = torch.zeros(4, 6).masked_fill(~bool_mask[0, 0], float("-inf")) + torch.randn(4, 6)
    out = attention(q, k, v, additive, False, None, 1)
    torch.testing.assert_close(out, naive_attention(q, k, v, mask=additive), atol=1e-5, rtol=1e-5)


def test_mask_and_causal_combine():
    q, k, v = qkv(lq=4, lk=6)
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padding[1, ..., :2] = False  # second sequence is left-padded by 2
    out = attention(q, k, v, padding, True, None, 1)
    expected = naive_attention(q, k, v, mask=padding, visible=causal_visibility(4, 6))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~padding, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive, True, None, 1), expected, atol=1e-5, rtol=1e-5)


def test_gqa_equals_repeated_kv():
    q, k, v = qkv(hq=4, hkv=2, lq=5, lk=5)
    out = attention(q, k, v, None, True, None, 2)
    repeated = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, True, None, 1)
    torch.testing.assert_close(out, repeated)
    # Query heads 0 and 1 share kv head 0: with identical queries their outputs are identical.
    q[:, 1] = q[:, 0]
    out = attention(q, k, v, None, False, None, 2)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    assert not torch.allclose(out[:, 1], out[:, 2])


def test_fp16_close_to_fp32():
    q, k, v = qkv(dtype=torch.float16)
    out = attention(q, k, v, None, True, None, 1)
    assert out.dtype == torch.float16
    expected = naive_attention(q.float(), k.float(), v.float(), visible=causal_visibility(5, 5))
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_fake_shape_under_export():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, None, True, None, 2)

    q, k, v = qkv(hq=4, hkv=2, dv=6)
    exported = torch.export.export(Attend(), (q, k, v))
    out_node = [n for n in exported.graph.nodes if n.target is torch.ops.fxforge.attention.default]
    assert len(out_node) == 1
    assert tuple(out_node[0].meta["val"].shape) == (2, 4, 5, 6)


@pytest.mark.parametrize(
    "kwargs, mask, match",
    [
        ({}, torch.zeros(3, 5, 5, dtype=torch.bool), "does not broadcast"),
        ({}, torch.zeros(5, 4), "does not broadcast"),
        ({}, torch.zeros(5, 5, dtype=torch.float64), "dtype torch.float64"),
        ({}, torch.zeros(5, 5, dtype=torch.int64), "must be torch.bool"),
        ({"hkv": 3, "hq": 4}, None, "cannot be shared"),
    ],
)
def test_validation_errors(kwargs, mask, match):
    q, k, v = qkv(**kwargs)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, mask, False, None, 1)


def test_wrong_group_count_is_refused():
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match=r"num_kv_groups == Hq // Hkv \(= 2\)"):
        attention(q, k, v, None, False, None, 1)
