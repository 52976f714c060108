"""Tiny random-weight transformers models for the attention constructs of issue 18.

Each family exercises one construct that fxforge's attention passes must understand:

    bloom       ALiBi through `baddbmm`, attention on head-merged (B·H, L, D) bmm, fused QKV
                with heads interleaved ([q, k, v] per head)
    mpt         ALiBi added to 4-D scores (a (H, 1, Lk) bias), fused QKV grouped [q | k | v]
    falcon_mqa  multi-query attention (1 key/value head), fused QKV grouped [q... | k | v],
                parallel attention + MLP, in-place `scores /= sqrt(d)`
    gpt_neox    fused QKV with heads interleaved, rotary positions
    falcon_alibi  Falcon's multi-query attention with ALiBi (a bias on scores built by baddbmm-free
                matmuls, its fused QKV grouped as in falcon_mqa)
    phi3        fused QKV (GQA: 4 query, 2 key/value heads) split by slicing, fused gate/up
                projection split by chunk, rotary positions
    gpt_bigcode multi-query attention, fused QKV grouped [q | k | v], learned positions

All use eager attention (the attention math is visible in the traced graph) and a causal LM
head, in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB = 128
LAYERS = 2


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    alibi: bool  # the fused attention must carry a position bias


def _common() -> dict:
    return dict(vocab_size=VOCAB, attn_implementation="eager", use_cache=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _bloom() -> nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=LAYERS, n_head=4, **_common()))


def _mpt() -> nn.Module:
    from transformers import MptConfig, MptForCausalLM

    return MptForCausalLM(MptConfig(d_model=32, n_layers=LAYERS, n_heads=4, expansion_ratio=2, max_seq_len=64,
                                    **_common()))


def _falcon_mqa() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                          multi_query=True, new_decoder_architecture=False, alibi=False,
                                          parallel_attn=True, bias=False, **_common()))


def _falcon_alibi() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                          multi_query=True, new_decoder_architecture=False, alibi=True,
                                          parallel_attn=True, bias=False, **_common()))


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, **_common()))


def _gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64, **_common()))


def _gpt_bigcode() -> nn.Module:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                                  multi_query=True, **_common()))


FAMILIES = {f.name: f for f in (
    Family("bloom", _bloom, alibi=True),
    Family("mpt", _mpt, alibi=True),
    Family("falcon_mqa", _falcon_mqa, alibi=False),
    Family("falcon_alibi", _falcon_alibi, alibi=True),
    Family("phi3", _phi3, alibi=False),
    Family("gpt_neox", _gpt_neox, alibi=False),
    Family("gpt_bigcode", _gpt_bigcode, alibi=False),
)}


def build(name: str, seed: int = 0) -> nn.Module:
    """The family's tiny model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return FAMILIES[name].build().eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own (uncached) logits for `ids`."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits
