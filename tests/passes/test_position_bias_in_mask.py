"""A position bias folded into the causal mask (Falcon with ALiBi: masked_fill(alibi/√d, hidden, min))
becomes the attention op's bias with a boolean mask, so add_kv_cache recomputes it over the cache
(it replaces the mask; before, the bias went with it and cached decoding differed from eager).
A plain float mask (zeros filled at hidden keys) and a mask computed from an input stay as they are."""
import math

import torch
from torch import nn

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.ops import get_op
from fxforge.ir.trace import trace
from fxforge.passes.attention.fuse_attention import FuseAttention
from fxforge.passes.context import PassContext

aten = torch.ops.aten
ATTENTION = get_op("attention").overload
H, D = 2, 8


class _Attention(nn.Module):
    """softmax(QKᵀ/√d + mask) V with mask = masked_fill(base, key j > query i, min)."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base

    def forward(self, q, k, v, pad):
        n = q.shape[-2]
        pos = torch.arange(n)
        hidden = (pos[None, :] > pos[:, None])[None, None]
        if self.base == "alibi":  # slopes · key position, as ALiBi
            slopes = torch.tensor([0.5, 0.25])[None, :, None, None]
            base = (slopes * pos[None, None, None, :].float()).expand(q.shape[0], H, 1, n) / math.sqrt(D)
        elif self.base == "zeros":
            base = torch.zeros(q.shape[0], 1, n, n)
        else:  # values from an input: not a position bias
            base = pad[:, None, None, :].expand(q.shape[0], 1, 1, n)
        mask = base.masked_fill(hidden, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1) @ v


def _fused(base: str):
    q, k, v = (torch.randn(2, H, 7, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pad = torch.randn(2, 7)
    gm = trace(_Attention(base).eval(), (q, k, v, pad), {}, dynamic_shapes=None)  # static heads
    canonicalize(gm)
    result = FuseAttention().run(gm, PassContext(example_inputs=(q, k, v, pad)))
    (node,) = [n for n in gm.graph.nodes if n.target == ATTENTION]
    torch.testing.assert_close(gm(q, k, v, pad)[0], _Attention(base)(q, k, v, pad), atol=1e-6, rtol=1e-6)
    return result, node


def test_a_position_bias_in_the_mask_becomes_the_ops_bias_with_a_boolean_mask():
    result, node = _fused("alibi")
    assert result.sites == 1
    mask, bias = node.args[3], node.args[7] if len(node.args) == 8 else None
    assert mask is None or mask.meta["val"].dtype == torch.bool  # boolean (or proven causal)
    assert bias is not None and bias.meta["val"].dtype == torch.float32


def test_a_plain_or_input_computed_float_mask_is_not_split():
    for base in ("zeros", "input"):
        result, node = _fused(base)
        assert result.sites == 1
        assert len(node.args) == 7 or node.args[7] is None, base  # no bias added
