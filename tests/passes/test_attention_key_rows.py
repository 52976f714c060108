"""fuse_attention hands the op one row of a padding mask that transformers expanded over the
queries (masking_utils' (B, 1, Lq, Lk) BERT mask), so the ONNX lowering sees key padding by
shape; a mask that varies by query is kept whole. Small hand-written modules spelled as
masking_utils writes the mask (tracing a real HF BERT costs seconds: test_fuse_attention's
slow "bert" case covers it)."""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import INPUT_NAMES, trace
from fxforge.ir.verify import run_graph
from fxforge.passes.attention.fuse_attention import FuseAttention
from fxforge.passes.context import PassContext
from fxforge.passes.pipeline import run_pass

ATTENTION = torch.ops.fxforge.attention.default
LOWEST = torch.finfo(torch.float32).min


class PaddedSelfAttention(nn.Module):
    """Eager attention over q = k = v = x split in 2 heads, with masking_utils' padding mask:
    (key padding (B, 1, 1, L) & `q_idx >= 0` (1, 1, L, 1)), expanded to (B, 1, L, L), as an
    additive lowest-float mask; `causal=True` ands in j <= i (a mask that varies by query)."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        heads = x.view(b, length, 2, -1).transpose(1, 2)
        positions = torch.arange(length)
        keys = attention_mask.to(torch.bool)[:, None, None, :]
        queries = positions[None, None, :, None] >= 0
        visible = queries & keys
        if self.causal:
            visible = visible & (positions[None, None, None, :] <= positions[None, None, :, None])
        bias = torch.where(visible.expand(b, 1, length, length), torch.zeros(()), LOWEST)
        scores = heads @ heads.transpose(-1, -2) * 0.25 + bias
        return (scores.softmax(-1) @ heads).transpose(1, 2).reshape(b, length, -1)


def _fused(causal: bool):
    inputs = {"x": torch.randn(2, 6, 8), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    dims = {0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=32)}
    gm = trace(PaddedSelfAttention(causal), (), inputs, dynamic_shapes={"x": dims, "attention_mask": dims})
    canonicalize(gm)
    flat = tuple(inputs[n] for n in gm.meta[INPUT_NAMES])
    return gm, run_pass(FuseAttention(), gm, PassContext(example_inputs=flat))


def _padded_inputs(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    return torch.randn(2, length, 8, generator=torch.Generator().manual_seed(length)), mask


def test_an_expanded_padding_mask_reaches_the_op_as_one_key_row():
    unfused, fused = _fused(causal=False)
    (attention,) = [n for n in fused.graph.nodes if n.target == ATTENTION]
    mask = attention.args[3]
    assert mask.target == torch.ops.aten.slice.Tensor and tuple(mask.args[1:4]) == (2, 0, 1)
    assert mask.meta["val"].shape[1:3] == (1, 1)  # (B, 1, 1, L): the lowering's key-padding shape
    for length in (5, 11):
        inputs = _padded_inputs(length)
        (want,), (got,) = run_graph(unfused, inputs), run_graph(fused, inputs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_mask_that_varies_by_query_is_kept_whole():
    unfused, fused = _fused(causal=True)
    (attention,) = [n for n in fused.graph.nodes if n.target == ATTENTION]
    mask = attention.args[3]
    assert mask.target != torch.ops.aten.slice.Tensor and mask.meta["val"].dim() == 4
    inputs = _padded_inputs(7)
    (want,), (got,) = run_graph(unfused, inputs), run_graph(fused, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
