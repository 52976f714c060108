"""Token-input helpers shared by the text models of the zoo: random right-padded batches and
the torch.export dynamic shapes of an (input_ids, attention_mask) pair."""
from __future__ import annotations

import torch
from torch.export import Dim

PAD_TOKEN_ID = 0
# Ids below this are special (pad, bos, eos) in the tiny configs; random text avoids them.
FIRST_TEXT_TOKEN_ID = 3


def token_dynamic_shapes(max_seq: int) -> dict:
    """Dynamic batch and sequence axes for kwargs {input_ids, attention_mask}.

    The two tensors share one batch Dim and one seq Dim, so torch.export keeps them equal;
    `max_seq` is the model's position limit.
    """
    batch = Dim("batch", min=1)
    seq = Dim("seq", min=1, max=max_seq)
    axes = {0: batch, 1: seq}
    return {"input_ids": axes, "attention_mask": dict(axes)}


def check_token_sizes(model_name: str, batch: int, seq: int, max_seq: int) -> None:
    """Refuse sizes outside what the model (and its dynamic_shapes) supports."""
    if batch < 1:
        raise ValueError(f"{model_name}: batch must be >= 1, got {batch}")
    if not 1 <= seq <= max_seq:
        raise ValueError(
            f"{model_name}: seq must be between 1 and {max_seq} (its position limit), got {seq}"
        )


def random_token_inputs(
    vocab_size: int, batch: int, seq: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random input_ids with a right-padded attention_mask.

    Row 1 (when there is one) ends in seq // 4 padding positions (mask 0, pad token), so
    every model sees a padded row, as batched inference does; the other rows are full.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(
        FIRST_TEXT_TOKEN_ID, vocab_size, (batch, seq), generator=generator, dtype=torch.long
    )
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    n_pad = seq // 4
    if batch > 1 and n_pad > 0:
        attention_mask[1, seq - n_pad :] = 0
        input_ids[1, seq - n_pad :] = PAD_TOKEN_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}
