"""The three model shapes of the composition matrix: GPT-2, Llama and BERT, tiny and random.

Smaller than the zoo's tiny models (one layer, hidden 64: the matrix runs ~800 pipelines, and a
pass's cost here is mostly per graph node), traced on `input_ids` alone so that `add_kv_cache`
applies to the decoders. Hidden 64 keeps group sizes of 32 valid for every linear layer.
`base` is the model `bitdelta` compresses against: the same architecture, its weights moved a
little (the "fine-tuned" model is `model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
MODELS = ("gpt2", "llama", "bert")


@dataclass
class Built:
    name: str
    model: nn.Module
    base: nn.Module  # bitdelta's base: `model` is treated as a fine-tune of it
    decoder: bool


def _config(name: str):
    common = dict(vocab_size=VOCAB, use_cache=False, attn_implementation="eager", pad_token_id=0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel, GPT2Config(n_embd=HIDDEN, n_layer=1, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2, **common)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM, LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128,
                                             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **common)
    if name == "bert":
        from transformers import BertConfig, BertModel

        return BertModel, BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, **common)
    raise KeyError(name)


@lru_cache(maxsize=None)
def build(name: str) -> Built:
    """The model named `name` ("gpt2", "llama", "bert") with seeded weights, in eval mode."""
    cls, config = _config(name)
    torch.manual_seed(0)
    base = cls(config).eval()
    torch.manual_seed(1)
    model = cls(config).eval()
    model.load_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in base.state_dict().items()})
    return Built(name, model, base, decoder=name != "bert")


def input_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def calibration() -> list[torch.Tensor]:
    """A tiny calibration set for the data-driven passes (wanda, flap, awq, ...)."""
    return [input_ids(2, 12, seed=10 + i) for i in range(2)]
