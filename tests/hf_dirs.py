"""Saved Hugging Face model directories for tests: small configs, random weights, a real tokenizer.

Model hubs are unreachable, so each directory is built the way a user's would be written:
`model.save_pretrained(dir)` (safetensors) plus a `tokenizers` BPE (decoders) or WordPiece
(encoders) tokenizer trained on a few sentences and saved with `PreTrainedTokenizerFast`.

    path = hf_dir(tmp_path_factory, "llama")        # "gpt2", "llama", "qwen2", "bert"
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a compiler rewrites a graph of tensor operations",
    "def add(a, b): return a + b",
    "hello world, this is a small tokenizer for tests",
    "quantize the weights, prune the heads, fuse the attention",
    "one two three four five six seven eight nine ten",
]
VOCAB = 384  # model vocab; tokenizers use at most this many ids (checked in build_model)

FAMILIES = ("gpt2", "llama", "qwen2", "bert")


def _decoder_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _encoder_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=320, special_tokens=special,
                                                                   show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def build_model(family: str) -> tuple[Any, Any]:
    """(model, tokenizer) of `family` with a tiny config and random weights (seeded)."""
    model, tokenizer = _build(family)
    assert len(tokenizer) <= VOCAB, f"tokenizer has {len(tokenizer)} ids, the model {VOCAB}"
    return model, tokenizer


def _build(family: str) -> tuple[Any, Any]:
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        tokenizer = _encoder_tokenizer()
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128,
                               pad_token_id=tokenizer.pad_token_id)
        return tf.BertForMaskedLM(config).eval(), tokenizer
    tokenizer = _decoder_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **special)
        return tf.GPT2LMHeadModel(config).eval(), tokenizer
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval(), tokenizer
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval(), tokenizer
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def save_hf_dir(family: str, directory: Path) -> Path:
    """Write `family`'s model and tokenizer to `directory` with save_pretrained; return it."""
    model, tokenizer = build_model(family)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def hf_dir(tmp_path_factory: Any, family: str) -> Path:
    """A fresh saved directory for `family` under pytest's tmp_path_factory."""
    return save_hf_dir(family, tmp_path_factory.mktemp(f"hf-{family}"))
