"""add_kv_cache finds how positions feed the model in two spellings the architecture sweep met:

- a MoE dispatch builds its own arange over the routed tokens (HF's grouped-experts path:
  `inv[perm] = arange(B·L·k)`) besides the position row: only the position row is rewired to
  position_ids, the dispatch arange (over the tokens of the current call) stays;
- BERT-style embeddings slice a registered arange buffer (`position_ids[:, :L]`) and look
  token-type ids up by position (`token_type_ids.expand(1, -1).gather(1, positions)`);
- positions counted by a cumsum over a per-token mask: all ones (OPT) or "not padding"
  (RoBERTa, CamemBERT, XLM-R, Data2Vec-text: `cumsum(ids != pad) * mask + pad`);
- a sinusoidal table looked up at `arange(L)` as a (L, D) row (RoFormer).

Either way cached decoding, token by token, equals the uncached model."""
import torch
from torch import nn

from fxforge.ir.canonicalize import canonicalize
from fxforge.ir.trace import trace
from fxforge.passes.context import PassContext
from fxforge.passes.kv_cache.add_kv_cache import AddKvCache
from fxforge.passes.pipeline import PipelineReport, run_pass
from fxforge.runtime.cache_inputs import cached_inputs, empty_past
from fxforge.runtime.meta_keys import KV_META


class _SortedDispatchLM(nn.Module):
    """Learned positions, one causal attention layer, a token-sorting 'MoE' MLP."""

    def __init__(self, vocab=32, dim=16, positions=64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.qkv, self.router = nn.Linear(dim, 3 * dim), nn.Linear(dim, 1)
        self.expert = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        b, n = ids.shape
        x = self.embed(ids) + self.pos(torch.arange(n, device=ids.device).unsqueeze(0))
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        visible = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(~visible, float("-inf"))
        x = x + (scores.softmax(-1) @ v)[:, 0]
        flat = x.reshape(b * n, -1)
        perm = self.router(flat)[:, 0].argsort()  # group tokens by "expert", then undo the sort
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(b * n, device=ids.device)
        routed = self.expert(flat[perm])[inverse]
        return self.lm_head(x + routed.reshape(b, n, -1))


class _BufferPositionsLM(nn.Module):
    """BERT-style embeddings: positions and token types read from registered buffers."""

    def __init__(self, vocab=32, dim=16, positions=64):
        super().__init__()
        self.embed, self.pos, self.types = nn.Embedding(vocab, dim), nn.Embedding(positions, dim), nn.Embedding(2, dim)
        self.register_buffer("position_ids", torch.arange(positions).expand(1, -1), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, positions, dtype=torch.long), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids):
        b, n = ids.shape
        positions = self.position_ids[:, :n]
        types = self.token_type_ids.expand(positions.shape[0], -1).gather(1, positions).expand(b, n)
        x = self.embed(ids) + self.pos(positions) + self.types(types)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        visible = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(~visible, float("-inf"))
        return self.lm_head(x + (scores.softmax(-1) @ v)[:, 0])


def _attend(x, qkv):
    n = x.shape[1]
    q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
    visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v)[:, 0]


class _CountedPositionsLM(nn.Module):
    """Learned positions counted by cumsum: `padding` as RoBERTa (ids != pad), else OPT (ones)."""

    def __init__(self, padding: bool, vocab=32, dim=16, positions=64, pad=1):
        super().__init__()
        self.padding, self.pad = padding, pad
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.qkv, self.lm_head = nn.Linear(dim, 3 * dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        if self.padding:
            mask = ids.ne(self.pad).int()
            positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.pad
        else:
            mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
            positions = (torch.cumsum(mask, dim=1) * mask - 1).long() + 2  # OPT's offset of 2
        x = self.embed(ids) + self.pos(positions)
        return self.lm_head(x + _attend(x, self.qkv))


class _SinusoidalTableLM(nn.Module):
    """RoFormer-style: a fixed (max_len, D) table read at arange(L), broadcast over the batch."""

    def __init__(self, vocab=32, dim=16, positions=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        angles = torch.arange(positions)[:, None] / 10.0 ** (torch.arange(dim)[None, :] / dim)
        self.table = nn.Embedding.from_pretrained(torch.sin(angles), freeze=True)
        self.qkv, self.lm_head = nn.Linear(dim, 3 * dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        row = self.table(torch.arange(0, ids.shape[1], dtype=torch.long, device=ids.device))[None, :, :]
        x = self.embed(ids) * (1 + row)  # multiplicative, as rotary tables are used
        return self.lm_head(x + _attend(x, self.qkv))


def _decode_token_by_token(model, position_sites):
    torch.manual_seed(0)
    model = model.eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    gm = trace(model, (ids,))
    canonicalize(gm)
    report = PipelineReport()
    cached = run_pass(AddKvCache(), gm, PassContext(example_inputs=(ids,)), report=report)
    assert report.records[-1].notes["position_sites"] == position_sites
    meta = cached.meta[KV_META]
    past, steps = empty_past(meta, 2, torch.float32), []
    for i in range(ids.shape[1]):
        out = cached(*cached_inputs(meta, ids[:, i:i + 1], i, past))
        steps.append(out[0])
        past = [out[j] for pair in meta.present for j in pair]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=1e-5)


def test_moe_dispatch_arange_is_not_a_position_row():
    _decode_token_by_token(_SortedDispatchLM(), position_sites=1)  # the position row, not the dispatch


def test_bert_style_position_buffer_is_rewired():
    _decode_token_by_token(_BufferPositionsLM(), position_sites=1)


def test_positions_counted_by_cumsum_of_ones_are_rewired():
    _decode_token_by_token(_CountedPositionsLM(padding=False), position_sites=1)


def test_positions_counted_by_cumsum_of_a_not_padding_mask_are_rewired():
    # a padding id no token has (ids are 0..31): the graph still counts `ids != pad`. With a pad
    # inside the prompt the uncached count skips it and position_ids (past + i) does not, as
    # in HF's own cached decoding, which adds the past length to a count over the new tokens
    _decode_token_by_token(_CountedPositionsLM(padding=True, pad=40), position_sites=1)


def test_a_position_table_looked_up_at_arange_is_rewired():
    _decode_token_by_token(_SinusoidalTableLM(), position_sites=1)
