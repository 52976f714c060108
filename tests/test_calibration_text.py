"""fxforge.calibration.text: calibration files -> samples -> token windows for `calibration=`."""
import json

import pytest
import torch
from hf_dirs import CORPUS, build_model

from fxforge.calibration import from_texts, read_calibration_file
from fxforge.errors import CalibrationError


@pytest.fixture(scope="module")
def tokenizer():
    return build_model("llama")[1]


def test_windows_are_full_and_cut_from_the_joined_token_stream(tokenizer):
    batches = from_texts(tokenizer, CORPUS, samples=1000, seq=8)
    stream = []
    for i, ids in enumerate(tokenizer(CORPUS, add_special_tokens=False)["input_ids"]):
        stream += ([tokenizer.eos_token_id] if i else []) + ids
    windows = torch.cat([b["input_ids"] for b in batches])
    assert windows.shape == (len(stream) // 8, 8)  # every whole window, nothing padded
    assert windows.flatten().tolist() == stream[: len(stream) // 8 * 8]
    assert all(b["attention_mask"].dtype == torch.long and bool(b["attention_mask"].all()) for b in batches)


def is_subsequence(rows, windows):
    position = 0
    for row in rows:
        while position < len(windows) and not torch.equal(windows[position], row):
            position += 1
        if position == len(windows):
            return False
        position += 1
    return True


def test_samples_are_drawn_by_seed_in_text_order_and_batched(tokenizer):
    texts = CORPUS * 10
    all_windows = torch.cat([b["input_ids"] for b in from_texts(tokenizer, texts, samples=10_000, seq=6)])
    a = from_texts(tokenizer, texts, samples=7, seq=6, batch=3, seed=1)
    assert [len(b["input_ids"]) for b in a] == [3, 3, 1]
    picked = torch.cat([b["input_ids"] for b in a])
    assert is_subsequence(picked, all_windows)  # drawn from the windows, kept in text order
    same = torch.cat([b["input_ids"] for b in from_texts(tokenizer, texts, samples=7, seq=6, batch=3, seed=1)])
    other = torch.cat([b["input_ids"] for b in from_texts(tokenizer, texts, samples=7, seq=6, batch=3, seed=2)])
    assert torch.equal(picked, same) and not torch.equal(picked, other)


def test_short_text_gives_one_window_of_all_its_tokens(tokenizer):
    (batch,) = from_texts(tokenizer, ["hello world"], seq=512)
    assert batch["input_ids"].tolist() == [tokenizer("hello world", add_special_tokens=False)["input_ids"]]


def test_from_texts_errors(tokenizer):
    with pytest.raises(CalibrationError, match="one str"):
        from_texts(tokenizer, "just a string")
    with pytest.raises(CalibrationError, match="no calibration texts"):
        from_texts(tokenizer, [])
    with pytest.raises(CalibrationError, match="seq must be a positive integer"):
        from_texts(tokenizer, CORPUS, seq=0)


def test_plain_text_file_is_one_sample_per_nonblank_line(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first sample\n\n  \nsecond sample, with {\"braces\"}\n", encoding="utf-8")
    assert read_calibration_file(path) == ["first sample", "second sample, with {\"braces\"}"]


def test_jsonl_file_reads_the_text_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(CORPUS[:3])) + "\n")
    assert read_calibration_file(path) == CORPUS[:3]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n \n", "is empty"),
    ("bad.jsonl", '{"text": "ok"}\n\n{"txt": "no"}\n', r"line 3 has no \"text\" string \(got keys \['txt'\]\)"),
    ("list.jsonl", '["a"]\n', r"line 1 has no \"text\" string \(got a list\)"),
    ("broken.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not JSON"),
    ("blank.jsonl", '{"text": "  "}\n', "line 1 has an empty"),
])
def test_calibration_file_errors_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message) as info:
        read_calibration_file(path)
    assert name in str(info.value)


def test_missing_or_binary_calibration_file(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration_file(tmp_path / "nope.txt")
    with pytest.raises(CalibrationError, match="is a directory"):
        read_calibration_file(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="must be UTF-8"):
        read_calibration_file(tmp_path / "bin.txt")
