"""Every decoder-only and encoder family of the installed transformers, built tiny.

The families are enumerated from transformers' auto mappings, not hand-picked:
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (decoders, `*ForCausalLM`) and
`MODEL_FOR_MASKED_LM_MAPPING_NAMES` (encoders, `*ForMaskedLM`). Each family's config class is
instantiated with its defaults and then shrunk by setting whichever of the common size
attributes it has (hidden ≤ 64, 2 layers, vocab ≤ 512). A family that cannot be built that way
(a multimodal/composite config, an encoder-decoder, a config that refuses the tiny sizes, a
model that needs an extra package) is kept in the table with the reason, never dropped.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 256
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 64
POSITIONS = 64

# (tiny value, attribute names that mean that size in different configs); a tuple of pairs,
# not a dict, because two sizes share a value
_SIZES = (
    # word_embed_proj_dim: OPT's embedding width, equal to hidden_size in every OPT but 350m; left
    # at its default (768) the tiny model's project_in/out hold most of the parameters
    (HIDDEN, ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "model_dim",
              "word_embed_proj_dim")),
    (LAYERS, ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")),
    (HEADS, ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads")),
    (INTERMEDIATE, ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size",
                   "decoder_ffn_dim", "hidden_dim", "moe_intermediate_size",
                   "shared_expert_intermediate_size")),
    (VOCAB, ("vocab_size",)),
    (POSITIONS, ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                "n_ctx", "max_sequence_length")),
)


@dataclass(frozen=True)
class Family:
    """One transformers model family: its model_type, role and head class name."""

    model_type: str
    kind: str  # "decoder" (causal LM) or "encoder" (masked LM)
    class_name: str


@dataclass
class Built:
    """A tiny random-weight model of a family, or why none could be built."""

    family: Family
    model: nn.Module | None = None
    skip: str | None = None


def families() -> list[Family]:
    """Every causal-LM and masked-LM family of the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    out = [Family(t, "decoder", c) for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
           if c.endswith("ForCausalLM")]
    out += [Family(t, "encoder", c) for t, c in MODEL_FOR_MASKED_LM_MAPPING_NAMES.items()
            if c.endswith("ForMaskedLM") and t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    return sorted(out, key=lambda f: (f.kind, f.model_type))


def _shrink(config) -> None:
    """Set every common size attribute the config has to the tiny value."""
    for value, names in _SIZES:
        for name in names:
            if isinstance(getattr(config, name, None), int):
                setattr(config, name, value)
    if isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = KV_HEADS
    if isinstance(getattr(config, "head_dim", None), int):
        config.head_dim = HIDDEN // HEADS
    if getattr(config, "model_type", None) in ("gptj", "codegen"):
        # their rotary covers the first rotary_dim (64) dims of each head, which must fit the tiny
        # head (others with a rotary_dim, e.g. MiniMax-M3, clamp it themselves)
        config.rotary_dim = HIDDEN // HEADS
    # layer-indexed lists (sliding/full attention patterns, MoE layer choices) must match 2 layers
    for name in ("layer_types", "block_types", "attention_layers"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) > LAYERS:
            setattr(config, name, list(value[:LAYERS]))
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, 4)
    for name in ("num_experts_per_tok", "moe_topk", "num_experts_per_token"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, 2)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= VOCAB:
            setattr(config, name, 0)
    config.use_cache = False


def _shrink_for(config, kind: str) -> None:
    _shrink(config)
    if kind == "decoder" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # BERT-style stacks run causally only when told


def _composite_reason(config_cls) -> str | None:
    """Why a config is not a plain single-stack text model (None when it is)."""
    sub = getattr(config_cls, "sub_configs", None) or {}
    if sub:
        return f"composite config ({', '.join(sorted(sub))} sub-configs): multimodal or nested"
    if getattr(config_cls, "is_encoder_decoder", False):
        return "encoder-decoder config"
    return None


@functools.lru_cache(maxsize=None)
def build(model_type: str, kind: str, seed: int = 0) -> Built:
    """The family's tiny model with seeded random weights in eval mode, or the skip reason."""
    import transformers
    from transformers import CONFIG_MAPPING

    family = next(f for f in families() if f.model_type == model_type and f.kind == kind)
    try:
        config_cls = CONFIG_MAPPING[model_type]
    except Exception as e:  # noqa: BLE001 - any failure here is the family's skip reason
        return Built(family, skip=f"no config class: {type(e).__name__}: {e}"[:200])
    reason = _composite_reason(config_cls)
    if reason:
        return Built(family, skip=reason)
    model_cls = getattr(transformers, family.class_name, None)
    if model_cls is None:
        return Built(family, skip=f"transformers has no class {family.class_name} (extra package?)")
    try:
        config = config_cls()
        _shrink_for(config, kind)
        config._attn_implementation = "eager"  # attention math visible in the graph
        if getattr(config, "is_encoder_decoder", False):
            return Built(family, skip="encoder-decoder config")
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        untie_routers(model, seed)
    except Exception as e:  # noqa: BLE001
        return Built(family, skip=f"tiny config does not build: {type(e).__name__}: {_first_line(e)}")
    hidden = _hidden(model.config)
    vocab = getattr(model.config, "vocab_size", None)
    if hidden is None or hidden > 64 or not isinstance(vocab, int) or vocab > 512:
        return Built(family, skip=f"config not shrinkable (hidden={hidden}, vocab={vocab})")
    if sum(p.numel() for p in model.parameters()) > 2_000_000:
        return Built(family, skip="tiny config still has > 2M parameters (a size attribute not covered)")
    return Built(family, model=model)


_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def untie_routers(model: nn.Module, seed: int = 0) -> list[str]:
    """Re-draw MoE router weights that the family initializes to zero; returns their names.

    Some families zero their router at init (AFMoE: `init.zeros_(router.gate.weight)`), which
    is harmless for training but makes every token's expert scores equal. Top-k over a tie is
    implementation-defined: torch's CPU topk picks experts 2,3 of 4, ONNX TopK (by its spec)
    the lowest indices 0,1, so a backend comparison would measure tie-breaking, not the backend.
    A router is recognized as an all-zero `nn.Linear` weight with one row per expert.
    """
    experts = next((getattr(model.config, n) for n in _EXPERT_COUNTS
                    if isinstance(getattr(model.config, n, None), int)), None)
    if experts is None:
        return []
    std = getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and weight.shape[0] == experts
                    and not weight.any()):
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                redrawn.append(f"{name}.weight")
    return redrawn


def _hidden(config) -> int | None:
    for name in _SIZES[0][1]:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:160]


def input_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    """Token ids avoiding the special ids 0..2."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def accepts_use_cache(model: nn.Module) -> bool:
    return "use_cache" in inspect.signature(model.forward).parameters
