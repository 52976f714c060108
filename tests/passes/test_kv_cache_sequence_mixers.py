"""add_kv_cache refuses, by name, what a KV cache cannot hold (instead of a numeric mismatch).

A KV cache is exact when every op outside attention computes each token from that token alone.
Layers that mix tokens elsewhere (a short convolution over the sequence as in Mamba / ZAYA /
Inkling, a linear-attention matmul over the tokens as in MiniMax's lightning attention, an SSM
scan) need a recurrent state carried between calls; a mask or bias computed from activations
(Doge's dynamic mask) is not recomputed over the cached keys. Each is refused with an error
naming the construct and the module it sits in."""
import pytest
import torch
from torch import nn

from fxforge.errors import PassError
from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import run_pass

DIM, VOCAB = 16, 32


def _causal(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class _Attention(nn.Module):
    """One-head causal softmax attention; `bias_from_values` adds a per-key bias from V."""

    def __init__(self, bias_from_values=False):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.dt_proj = nn.Linear(DIM, 1) if bias_from_values else None

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / 4.0
        hidden = ~_causal(x.shape[1], x.device)
        if self.dt_proj is not None:  # Doge-style: bias per key from its value, masked causally
            bias = self.dt_proj(v).transpose(-1, -2).expand(-1, -1, x.shape[1], -1)
            scores = scores + bias.masked_fill(hidden, torch.finfo(x.dtype).min)
        else:
            scores = scores.masked_fill(hidden, float("-inf"))
        return (scores.softmax(-1) @ v)[:, 0]


class _ShortConv(nn.Module):
    """A depthwise causal convolution over the sequence (Mamba's conv1d, ZAYA's conv on q/k)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(DIM, DIM, kernel_size=3, padding=2, groups=DIM)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)


class _LinearAttention(nn.Module):
    """Causal linear attention: (Q Kᵀ ⊙ causal) V with no softmax (lightning attention)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = (q @ k.transpose(-2, -1)) * _causal(x.shape[1], x.device)
        return weights @ v


class _Scan(nn.Module):
    """A cumulative sum over the sequence (the recurrence of a state-space layer, unrolled)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        return torch.cumsum(self.proj(x), dim=1)


class _LM(nn.Module):
    def __init__(self, mixer: nn.Module, attention: nn.Module):
        super().__init__()
        self.embed, self.lm_head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)
        self.mixer, self.attention = mixer, attention

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.mixer(x)
        return self.lm_head(x + self.attention(x))


def _add_kv_cache(model):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    gm = trace(model.eval(), (ids,))
    canonicalize(gm)
    return run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)))


@pytest.mark.parametrize("mixer, construct", [
    (_ShortConv(), "a convolution over the sequence at 'mixer.conv'"),
    (_LinearAttention(), "a matmul contracting over the sequence"),
    (_Scan(), "a cumulative scan over the sequence"),
])
def test_sequence_mixers_outside_attention_are_refused_by_name(mixer, construct):
    with pytest.raises(PassError, match="cannot cache this graph") as e:
        _add_kv_cache(_LM(mixer, _Attention()))
    assert construct in str(e.value) and "recurrent state" in str(e.value)


def test_the_same_model_without_the_mixer_is_cached():
    # the check does not refuse attention itself, nor per-token layers
    cached = _add_kv_cache(_LM(nn.Linear(DIM, DIM), _Attention()))
    assert any(n.name == "past_key_0" for n in cached.graph.nodes)


def test_a_mask_computed_from_activations_is_refused_as_content_dependent():
    with pytest.raises(PassError, match="content-dependent") as e:
        _add_kv_cache(_LM(nn.Linear(DIM, DIM), _Attention(bias_from_values=True)))
    assert "attention.dt_proj" in str(e.value)
