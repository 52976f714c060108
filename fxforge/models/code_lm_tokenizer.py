"""Byte-level BPE tokenizer for the `code-lm` zoo model, trained with the `tokenizers` package.

Byte-level means every byte has a token of its own before merges, so any text (including
non-ASCII identifiers and strings in the stdlib) encodes and decodes back exactly. The only
special token is the end-of-text marker that separates files in the training stream.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` tokens (special token included) on ``texts``.

    Example::

        tokenizer = train_bpe_tokenizer(["def f(x):\\n    return x\\n"] * 100, vocab_size=300)
        tokenizer.decode(tokenizer.encode("def g(): pass").ids)  # 'def g(): pass'
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(byte_alphabet):
        raise ValueError(
            f"a byte-level BPE needs more than {len(byte_alphabet)} tokens (one per byte plus "
            f"merges); got vocab_size={vocab_size}."
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: source files start at column 0, and decode must give back the text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-text token; raises if the tokenizer was not made by this module."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(
            f"tokenizer has no {EOS_TOKEN!r} token; code-lm tokenizers come from "
            "train_bpe_tokenizer (retrain the model if its tokenizer.json was replaced)."
        )
    return token_id
