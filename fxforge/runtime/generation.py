"""Batched KV-cached generation over any decoder step: greedy or sampled, left-padded batches.

One loop for every runtime that exposes the conventional decoder call (`CompiledModel.generate`
on any backend, `runtime.onnx_decoder.OnnxDecoder` on a decoder artifact):

    step(input_ids (B, L), attention_mask (B, P + L), position_ids (B, L), past [k0, v0, ...])
        -> (logits (B, L, V), present [k0, v0, ...] each (B, Hkv, P + L, D))

Prompts are left-padded (0 in `attention_mask`), as HF `generate` expects for decoder-only
models; positions count real tokens only (`cumsum(mask) - 1`), so a padded row decodes exactly
as it would alone. A row that emitted `eos_token_id` is finished: it receives `pad_token_id`
from then on, and the loop stops when every row is finished or after `max_new_tokens`.
The result is HF's layout too: (B, prompt length + generated), prompt included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fxforge.errors import InputError
from fxforge.runtime.layouts import KVCacheLayout

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[torch.Tensor]],
                  tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. `do_sample=False`: argmax (greedy), the other fields unused.

    temperature: logits are divided by it before sampling (> 0).
    top_k: sample among the k most likely tokens only (0: all).
    seed: seeds a private generator, so a seeded call repeats exactly and leaves torch's
        global random state alone.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if type(self.top_k) is not int or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0: no top-k filter), got {self.top_k!r}")

    def chooser(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """next_tokens(logits (B, V)) -> (B,) int64."""
        if not self.do_sample:
            return lambda logits: logits.argmax(dim=-1)
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(self.seed)
        else:
            generator.seed()

        def sample(logits: torch.Tensor) -> torch.Tensor:
            scores = logits.float() / self.temperature
            if self.top_k and self.top_k < scores.shape[-1]:
                kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)

        return sample


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) as (B, T) int64 tensors; InputError for right padding, shape or dtype problems."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be a non-empty (batch, length) integer tensor, got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}")
    ids = ids.long()
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask[None]
        if tuple(mask.shape) != tuple(ids.shape):
            raise InputError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
        mask = (mask != 0).long()
    if not bool(mask[:, -1].all()):
        rows = [i for i in range(mask.shape[0]) if not mask[i, -1]]
        raise InputError(f"rows {rows} of attention_mask end in padding: decoder-only generation needs "
                         "left padding (tokenizer.padding_side = 'left'), so every row's last token is real")
    return ids, mask


def generate_tokens(step: StepFn, empty_past: Callable[[int], list[torch.Tensor]], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
                    eos_token_id: int | None = None, pad_token_id: int | None = None,
                    sampling: SamplingOptions = SamplingOptions()) -> torch.Tensor:
    """Prompt + generated tokens, (B, T + n) with n <= max_new_tokens (see the module docstring)."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids, mask = check_prompt(input_ids, attention_mask)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    choose = sampling.chooser()
    batch = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate builds them
    logits, past = step(ids, mask, positions, empty_past(batch))
    finished = torch.zeros(batch, dtype=torch.bool)
    out = [ids]
    for i in range(max_new_tokens):
        token = choose(logits[:, -1]).long().cpu()
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out.append(token[:, None])
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        positions = mask.sum(-1, keepdim=True)  # the next real position of every row
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        logits, past = step(token[:, None], mask, positions, past)
    return torch.cat(out, dim=1)


def padded_tree_mask(attention_mask: torch.Tensor, new_len: int) -> torch.Tensor:
    """(B, 1, L, P + L) bool from a padding mask: what `passes/kv_cache/padding.py` computes in-graph, for
    graphs that take the tree mask itself (add_kv_cache without attention_mask=True)."""
    total = attention_mask.shape[1]
    keys = torch.arange(total)[None, :]
    queries = torch.arange(total - new_len, total)[:, None]
    allowed = (keys <= queries) & (attention_mask != 0)[:, None, None, :]
    return allowed | (keys == queries)


def layout_step(layout: KVCacheLayout, run: Callable[..., Sequence[torch.Tensor]]) -> StepFn:
    """A `StepFn` over a cached graph's flat inputs/outputs as its layout places them."""
    def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             past: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        flat: list = [None] * layout.num_inputs
        flat[layout.input_ids], flat[layout.position_ids] = ids, positions
        flat[layout.mask] = mask if layout.padding_mask else padded_tree_mask(mask, ids.shape[1])
        for (k_index, v_index), k, v in zip(layout.past, past[0::2], past[1::2]):
            flat[k_index], flat[v_index] = k, v
        if layout.tree_parents is not None:
            flat[layout.tree_parents] = torch.full((ids.shape[1],), -1)  # no tree: all accepted
        with torch.no_grad():
            out = run(*flat)
        return out[layout.logits_output], [out[i] for pair in layout.present for i in pair]
    return step


def layout_empty_past(layout: KVCacheLayout) -> Callable[[int], list[torch.Tensor]]:
    """batch -> zero-length past keys/values [k0, v0, ...] in the layout's shapes and dtype."""
    def empty(batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, heads, 0, dim, dtype=layout.torch_dtype)
                for heads, key_dim, value_dim in layout.kv_shapes for dim in (key_dim, value_dim)]
    return empty


__all__ = ["SamplingOptions", "StepFn", "check_prompt", "generate_tokens", "layout_empty_past", "layout_step",
           "padded_tree_mask"]
