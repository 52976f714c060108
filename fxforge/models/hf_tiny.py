"""Tiny randomly initialized Hugging Face transformers: GPT-2, Llama (grouped-query attention)
and BERT, each small enough to trace in seconds.

They are the bare transformers modules (module paths read `transformer.h.0.attn.c_attn`,
`model.layers.0.self_attn.q_proj`, `encoder.layer.0.attention.self.query`) with eager
attention, so the attention math is visible in the traced graph. Inputs are keyword
arguments {input_ids, attention_mask}, batch 2 and seq 16 by default, row 1 right-padded.
"""
from __future__ import annotations

from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from fxforge.models._tokens import (
    PAD_TOKEN_ID,
    check_token_sizes,
    random_token_inputs,
    token_dynamic_shapes,
)
from fxforge.models.base import ZooModel, seeded

VOCAB_SIZE = 256
MAX_POSITIONS = 128
# Shared by all three so every tiny model reads the same inputs.
SPECIAL_TOKENS = dict(pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)


def _build_text_model(
    name: str,
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    description: str,
    seed: int,
) -> ZooModel:
    """Instantiate `model_class(config)` under `seed` and attach example inputs."""
    with seeded(seed):
        model = model_class(config).eval()

    def make_inputs(batch: int = 2, seq: int = 16) -> tuple[tuple, dict]:
        check_token_sizes(name, batch, seq, MAX_POSITIONS)
        return (), random_token_inputs(VOCAB_SIZE, batch, seq, seed)

    args, kwargs = make_inputs()
    return ZooModel(
        name=name,
        model=model,
        args=args,
        kwargs=kwargs,
        dynamic_shapes=token_dynamic_shapes(MAX_POSITIONS),
        description=description,
        make_inputs=make_inputs,
    )


def build_tiny_gpt2(seed: int) -> ZooModel:
    """GPT2LMHeadModel: vocab 256, n_embd 64, 2 layers, 4 heads; returns logits (B, S, 256)."""
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_POSITIONS,
        use_cache=False,
        attn_implementation="eager",
        **SPECIAL_TOKENS,
    )
    return _build_text_model(
        "tiny-gpt2",
        GPT2LMHeadModel,
        config,
        "GPT-2 LM (2 layers, 4 heads, hidden 64, vocab 256), Conv1D projections, eager attention",
        seed,
    )


def build_tiny_llama(seed: int) -> ZooModel:
    """LlamaForCausalLM with GQA (4 query heads, 2 kv heads); returns logits (B, S, 256)."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        use_cache=False,
        attn_implementation="eager",
        **SPECIAL_TOKENS,
    )
    return _build_text_model(
        "tiny-llama",
        LlamaForCausalLM,
        config,
        "Llama LM (2 layers, 4 heads / 2 kv heads, hidden 64, SwiGLU 128, vocab 256), "
        "RMSNorm, RoPE, eager attention",
        seed,
    )


def build_tiny_bert(seed: int) -> ZooModel:
    """BertModel encoder; returns (last_hidden_state (B, S, 64), pooler_output (B, 64)).

    token_type_ids may also be passed; left out, BERT uses all zeros.
    """
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        use_cache=False,
        attn_implementation="eager",
        pad_token_id=PAD_TOKEN_ID,
    )
    return _build_text_model(
        "tiny-bert",
        BertModel,
        config,
        "BERT encoder (2 layers, 4 heads, hidden 64, intermediate 128, vocab 256) with pooler, "
        "eager attention",
        seed,
    )


__all__: list[str] = ["build_tiny_gpt2", "build_tiny_llama", "build_tiny_bert"]
