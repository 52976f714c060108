"""Tests of the code-lm zoo model: corpus split, tokenizer, training, perplexity and the cache.

One tiny model is trained for a few dozen steps on a few hundred kB into a temporary cache
(never the user's), and shared by the tests that need a trained model.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fxforge.errors import ArtifactError, InputError
from fxforge.models import code_lm_data
from fxforge.models.code_lm import (
    VARIANTS, cache_dir_for, heldout_batches, load_code_lm, main, new_model, perplexity,
    train_code_lm,
)
from fxforge.models.code_lm_data import (
    is_heldout, list_stdlib_sources, split_stdlib, windows_evenly_spaced,
)
from fxforge.models.code_lm_tokenizer import EOS_TOKEN, train_bpe_tokenizer
from fxforge.models.code_lm_train import learning_rate, torch_threads, train_causal_lm

# A tiny run: enough steps to move the loss, few enough to take seconds on a busy CPU.
TEST_VARIANT = replace(VARIANTS["tiny"], training=replace(
    VARIANTS["tiny"].training, max_steps=40, minutes=None, batch_size=8, warmup_steps=5,
    train_bytes=200_000))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: a second OpenMP thread only adds spinning on a shared CI machine.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fxforge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXFORGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def trained(cache_root):
    torch.manual_seed(0)
    return train_code_lm(TEST_VARIANT, progress=False)


# --- corpus and split -------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint_by_file():
    first, second = split_stdlib(), split_stdlib()
    assert first == second
    train, heldout = set(first.train), set(first.heldout)
    assert not train & heldout
    assert train | heldout == set(list_stdlib_sources())
    assert list(first.train) == sorted(first.train) and list(first.heldout) == sorted(heldout)
    assert all(is_heldout(f) for f in heldout) and not any(is_heldout(f) for f in train)
    fraction = len(heldout) / (len(train) + len(heldout))
    assert 0.02 < fraction < 0.10, fraction


def test_corpus_excludes_tests_tools_and_machine_specific_files(tmp_path):
    wanted = ["os.py", "json/decoder.py", "asyncio/tasks.py"]
    unwanted = ["test/test_os.py", "tkinter/test/test_widgets.py", "distutils/tests/t.py",
                "idlelib/editor.py", "lib2to3/main.py", "site-packages/pkg/mod.py",
                "_sysconfigdata__linux_x86_64-linux-gnu.py", "config-3.11-x86_64/python-config.py",
                "json/notes.txt"]
    for relative in wanted + unwanted:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n")
    assert list_stdlib_sources(tmp_path) == sorted(wanted)


def test_heldout_windows_are_evenly_spaced_and_do_not_overlap():
    stream = torch.arange(1000)
    windows = windows_evenly_spaced(stream, seq_len=30, count=7)
    assert windows.shape == (7, 30)
    assert windows.unique().numel() == windows.numel()  # no token used twice
    assert windows[-1, 0] > 800  # reaches the end of the stream, not only its start
    with pytest.raises(Exception, match="fewer batches"):
        windows_evenly_spaced(stream, seq_len=300, count=4)


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_round_trips_text_exactly():
    split = split_stdlib()
    texts = code_lm_data.read_sources(split.train[:20])
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(EOS_TOKEN) is not None
    sample = code_lm_data.read_sources(split.heldout[:1])[0][:5000]
    tricky = "def f(\tx):\n    return 'héllo ✓ 漢字'  # trailing spaces   \n\n"
    for text in (sample, tricky):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(sample).ids) < len(sample.encode("utf-8"))  # merges compress


# --- perplexity on hand-made logits -----------------------------------------------------------

def test_perplexity_of_uniform_logits_is_the_vocab_size():
    vocab = 37
    batches = [torch.randint(0, vocab, (2, 9)), torch.randint(0, vocab, (3, 5))]
    ppl = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), batches)
    assert ppl == pytest.approx(vocab, rel=1e-5)


def test_perplexity_scores_next_tokens_and_accepts_tuples():
    vocab = 11
    batch = torch.randint(0, vocab, (2, 8))

    def oracle(ids):  # puts all its mass on the true next token (known from the batch)
        logits = torch.full((*ids.shape, vocab), -30.0)
        logits[:, :-1].scatter_(-1, batch[:, 1:, None], 30.0)
        return (logits,)

    assert perplexity(oracle, [batch]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="expected"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], vocab), [batch])


# --- training, evaluation and the cache -------------------------------------------------------

def test_training_lowers_the_loss(trained):
    record = trained.info["training"]
    assert record["steps"] == TEST_VARIANT.training.max_steps
    assert record["last_loss"] < record["first_loss"] - 0.3, record


def test_trained_model_beats_untrained_on_heldout(trained):
    batches = trained.heldout_batches(max_batches=4)
    torch.manual_seed(0)
    untrained = new_model(TEST_VARIANT, trained.tokenizer.get_vocab_size()).eval()
    ppl_untrained = perplexity(untrained, batches)
    ppl_trained = perplexity(trained.model, batches)
    assert ppl_trained < 0.8 * ppl_untrained, (ppl_trained, ppl_untrained)
    assert math.isfinite(trained.heldout_perplexity) and trained.heldout_perplexity > 1


def test_heldout_batches_are_deterministic(trained):
    first = heldout_batches(trained.tokenizer, seq_len=32, max_batches=3, batch_size=2)
    second = heldout_batches(trained.tokenizer, seq_len=32, max_batches=3, batch_size=2)
    assert len(first) == 3 and all(b.shape == (2, 32) and b.dtype == torch.long for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_encode_decode_and_texts(trained):
    ids = trained.encode("import os\nprint(os.sep)\n")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert trained.decode(ids) == "import os\nprint(os.sep)\n"
    assert len(trained.heldout_texts()) == len(split_stdlib().heldout)
    assert trained.model.training is False


def test_cache_reloads_the_same_weights(trained, cache_root):
    assert trained.cache_dir == cache_dir_for("tiny")
    assert trained.cache_dir.parent == cache_root
    loaded = load_code_lm("tiny", train_if_missing=False)
    expected = trained.model.state_dict()
    got = loaded.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.tokenizer.to_str() == trained.tokenizer.to_str()
    assert loaded.info["split"]["heldout"] == list(split_stdlib().heldout)
    batches = trained.heldout_batches(max_batches=2)
    assert perplexity(loaded.model, batches) == perplexity(trained.model, batches)


def _break_weights(d: Path):
    (d / "model.safetensors").write_bytes(b"not a safetensors file")


def _break_info(d: Path):
    (d / "code_lm.json").write_text("{ truncated")


def _drop_tokenizer(d: Path):
    (d / "tokenizer.json").unlink()


def _break_tokenizer(d: Path):
    (d / "tokenizer.json").write_text('{"model": 3}')


@pytest.mark.parametrize("corrupt", [_break_weights, _break_info, _drop_tokenizer,
                                     _break_tokenizer])
def test_corrupted_cache_gives_a_clear_error(trained, tmp_path, monkeypatch, corrupt):
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    broken = cache_dir_for("tiny")
    shutil.copytree(trained.cache_dir, broken)
    corrupt(broken)
    with pytest.raises(ArtifactError) as caught:
        load_code_lm("tiny", train_if_missing=True)  # never silently overwritten
    message = str(caught.value)
    assert str(broken) in message and "python -m fxforge.models.code_lm train" in message
    assert broken.exists()


def test_missing_cache_without_training_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    with pytest.raises(ArtifactError, match="no code-lm 'small' is cached"):
        load_code_lm("small", train_if_missing=False)


def test_cli_rejects_an_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--variant", "huge"])
    assert "invalid choice" in capsys.readouterr().err


# --- the training loop's schedule and time box ------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = TEST_VARIANT.training
    warm = [learning_rate(settings, s, s / settings.max_steps) for s in range(settings.warmup_steps)]
    assert warm == sorted(warm) and warm[-1] == pytest.approx(settings.lr)
    midway = settings.lr * (1 + settings.min_lr_ratio) / 2
    assert learning_rate(settings, 10, 0.5) == pytest.approx(midway)
    assert learning_rate(settings, 10, 1.0) == pytest.approx(settings.lr * settings.min_lr_ratio)


def test_training_stops_at_the_wall_clock_budget():
    model = new_model(TEST_VARIANT, vocab_size=300)
    settings = replace(TEST_VARIANT.training, max_steps=100_000, minutes=0.02)  # 1.2 s
    report = train_causal_lm(model, torch.randint(0, 300, (5000,)), 32, settings, progress=False)
    assert 0 < report.steps < settings.max_steps
    assert report.seconds < 10
    assert model.training is False


def test_zoo_entry_serves_the_cached_model(trained):
    from fxforge.models import get_model

    zoo = get_model("code-lm-tiny")
    (ids,), kwargs = zoo.args, zoo.kwargs
    assert ids.shape == (2, 64) and ids.dtype == torch.int64 and kwargs == {}
    with torch.no_grad():
        logits = zoo.model(ids).logits
    assert logits.shape == (2, 64, zoo.model.config.vocab_size)
    (other,), _ = zoo.make_inputs(batch=1, seq=20)
    assert other.shape == (1, 20)
