"""Calibration batches from text: a file of samples -> token windows `compile(calibration=...)` takes.

    texts = read_calibration_file("calib.txt")          # one sample per line, or JSONL {"text": ...}
    batches = from_texts(tokenizer, texts, samples=128, seq=512)
    fxforge.compile(model, args, kwargs, passes="quantize(bits=4,method=gptq)", calibration=batches)

How text becomes batches: the samples are tokenized, joined into one token stream (the
tokenizer's EOS, or SEP, between them) and cut into windows of exactly `seq` tokens, as GPTQ
and AWQ calibrate. Not one padded row per sample, because the statistics calibrated passes
gather (Hessians of linear inputs, activation magnitudes) are taken at every position: padding
positions would enter them as if they were text, and short samples would mostly be padding.
Every window is full, so its attention mask is all ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from fxforge.errors import CalibrationError

__all__ = ["from_texts", "read_calibration_file"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def from_texts(tokenizer: Any, texts: Sequence[str], *, samples: int = 128, seq: int = 512, batch: int = 1,
               seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Up to `samples` windows of `seq` tokens of `texts`, in batches of `batch` rows.

    Each batch is {"input_ids": (rows, seq) int64, "attention_mask": ones}, the inputs of a model
    traced by `fxforge.from_pretrained` (a graph taking input_ids alone reads just that key).
    When the text holds more windows than `samples`, `samples` of them are drawn at random
    (seeded by `seed`) and kept in text order; when it holds fewer, all are used. Text shorter
    than one window gives one window of all its tokens.

    Raises CalibrationError for no texts, bad sizes, or text that tokenizes to under 2 tokens.
    """
    if isinstance(texts, str):
        raise CalibrationError("texts must be a list of strings (samples), got one str; wrap it: [text]")
    texts = list(texts)
    for name, value in (("samples", samples), ("seq", seq), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CalibrationError(f"calibration {name} must be a positive integer, got {value!r}")
    if not texts:
        raise CalibrationError("no calibration texts: give at least one sample")
    stream = _token_stream(tokenizer, texts)
    if len(stream) < 2:
        raise CalibrationError(f"the calibration texts hold {len(stream)} token(s); give more text")
    seq = min(seq, len(stream))
    windows = torch.tensor(stream[: len(stream) // seq * seq], dtype=torch.long).view(-1, seq)
    if len(windows) > samples:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(windows), generator=generator)[:samples].sort().values
        windows = windows[keep]
    return [{"input_ids": rows, "attention_mask": torch.ones_like(rows)} for rows in windows.split(batch)]


def _token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is None:
        separator = getattr(tokenizer, "sep_token_id", None)
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if i and separator is not None:
            stream.append(int(separator))
        stream.extend(int(t) for t in ids)
    return stream


def read_calibration_file(path: str | Path) -> list[str]:
    """The samples of a calibration file: plain text (one per non-blank line) or JSONL.

    A file ending in .jsonl/.ndjson holds one JSON object per line with a string "text" field.
    Raises CalibrationError naming the file (and line) for a missing, unreadable or empty file,
    a line that is not JSON, or one without a "text" string.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CalibrationError(f"calibration file {str(path)!r} {what}; pass a text file (one sample per line) "
                               f"or a .jsonl file with a \"text\" field")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {exc}; it must be UTF-8 text") from exc
    lines = [(number, line) for number, line in enumerate(content.splitlines(), start=1) if line.strip()]
    if not lines:
        raise CalibrationError(f"calibration file {str(path)!r} is empty; give at least one sample")
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        return [line for _, line in lines]
    return [_jsonl_text(path, number, line) for number, line in lines]


def _jsonl_text(path: Path, number: int, line: str) -> str:
    where = f"calibration file {str(path)!r} line {number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CalibrationError(f"{where} is not JSON ({exc}); each line of a .jsonl file is one object "
                               f"like {{\"text\": \"...\"}}") from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        got = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise CalibrationError(f"{where} has no \"text\" string (got {got}); each line must be an object "
                               f"like {{\"text\": \"...\"}}")
    if not text.strip():
        raise CalibrationError(f"{where} has an empty \"text\"; remove the line or fill it")
    return text
