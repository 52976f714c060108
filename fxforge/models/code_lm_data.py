"""Data for the `code-lm` zoo model: the running interpreter's standard library, split by file.

The corpus is every ``*.py`` file of ``sysconfig.get_paths()["stdlib"]`` except test suites,
idlelib, lib2to3, site-packages and the machine-specific build files (``_sysconfigdata*``,
``config-*``), so two machines with the same Python version see the same text. Each file
goes to the held-out set when a SHA-256 of its relative path falls in the lowest
``HELDOUT_PERCENT`` percent: the rule needs no random state and never moves a file when
others are added. This module also turns texts into the token stream that training samples
from and into the fixed held-out batches that perplexity is measured on.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from fxforge.errors import FxforgeError
from fxforge.models.code_lm_tokenizer import eos_id

HELDOUT_PERCENT = 5
SPLIT_RULE = f"int(sha256(relative_posix_path)[:8], 16) % 100 < {HELDOUT_PERCENT} -> heldout"

# Directory names anywhere in a relative path that exclude the file: test suites and tools
# that are not library code, plus installed third-party packages.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})


@dataclass(frozen=True)
class StdlibSplit:
    """Relative POSIX paths (under the stdlib root) of the train and held-out files, sorted."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def stdlib_root() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(relative: Path) -> bool:
    if set(relative.parts[:-1]) & _EXCLUDED_DIRS:
        return True
    # Generated at build time with this machine's paths and compiler flags: not portable.
    if relative.name.startswith("_sysconfigdata"):
        return True
    return relative.parts[0].startswith("config-")


def list_stdlib_sources(root: Path | None = None) -> list[str]:
    """Sorted relative paths of the stdlib ``*.py`` files that make up the corpus."""
    return list(_list_sources(str(root or stdlib_root())))


@functools.lru_cache(maxsize=4)
def _list_sources(root: str) -> tuple[str, ...]:
    # os.walk with pruning, not rglob: site-packages can hold far more files than the stdlib.
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        for name in files:
            relative = Path(directory, name).relative_to(root)
            if name.endswith(".py") and not _is_excluded(relative):
                found.append(relative.as_posix())
    return tuple(sorted(found))


def path_hash(relative_path: str) -> int:
    """A stable 32-bit hash of a relative path (same on every machine and Python run)."""
    return int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16)


def is_heldout(relative_path: str) -> bool:
    """Whether a corpus file belongs to the held-out set (see ``SPLIT_RULE``)."""
    return path_hash(relative_path) % 100 < HELDOUT_PERCENT


def split_stdlib(root: Path | None = None) -> StdlibSplit:
    """Split the stdlib corpus into train and held-out files by the fixed hash rule."""
    files = list_stdlib_sources(root)
    if not files:
        raise FxforgeError(
            f"found no *.py files under the stdlib directory {root or stdlib_root()}; the "
            "code-lm corpus needs a Python installation that ships its standard library sources."
        )
    return StdlibSplit(
        train=tuple(f for f in files if not is_heldout(f)),
        heldout=tuple(f for f in files if is_heldout(f)),
    )


def read_sources(relative_paths: list[str] | tuple[str, ...], root: Path | None = None) -> list[str]:
    """Read corpus files as text, in the given order.

    Undecodable bytes are replaced rather than fatal: a stray Latin-1 byte in one file should
    not stop training, and the replacement is deterministic.
    """
    root = root or stdlib_root()
    texts = []
    for relative in relative_paths:
        path = root / relative
        if not path.is_file():
            raise FxforgeError(
                f"code-lm corpus file {relative} is missing under {root}. The cached split was "
                "made with a different Python installation; retrain with "
                "`python -m fxforge.models.code_lm train`."
            )
        texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    return texts


def limit_by_bytes(relative_paths: tuple[str, ...] | list[str], max_bytes: int | None,
                   root: Path | None = None) -> list[str]:
    """A deterministic subset of files holding about ``max_bytes`` of source (all if None).

    Files are taken in path-hash order rather than alphabetically, so a small budget still
    samples many packages instead of only ``__future__.py`` .. ``asyncio/``. The result is
    sorted again so it reads like the full list.
    """
    if max_bytes is None:
        return list(relative_paths)
    root = root or stdlib_root()
    chosen, total = [], 0
    for relative in sorted(relative_paths, key=path_hash):
        if total >= max_bytes:
            break
        chosen.append(relative)
        total += (root / relative).stat().st_size
    return sorted(chosen)


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Encode texts into one 1-D LongTensor, each file followed by the end-of-text token."""
    separator = eos_id(tokenizer)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def windows_evenly_spaced(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seq_len`` tokens spread evenly over the stream.

    Spreading (instead of taking the first ``count`` windows) makes a small evaluation cover
    every held-out file, not only the alphabetically first ones.
    """
    available = stream.numel() // seq_len
    if available < count:
        raise FxforgeError(
            f"the held-out stream has {stream.numel()} tokens, enough for {available} windows of "
            f"{seq_len} tokens but {count} were asked for; ask for fewer batches or a shorter "
            "seq_len."
        )
    stride = stream.numel() // count  # >= seq_len, so windows never overlap
    starts = torch.arange(count) * stride
    return stream[starts[:, None] + torch.arange(seq_len)[None, :]]


# Encoding the held-out files takes seconds; evaluations repeat it with the same tokenizer.
_HELDOUT_STREAMS: dict[str, torch.Tensor] = {}


def heldout_stream(tokenizer: Tokenizer) -> torch.Tensor:
    """The held-out files encoded as one token stream (memoized per tokenizer content)."""
    key = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    if key not in _HELDOUT_STREAMS:
        _HELDOUT_STREAMS[key] = token_stream(tokenizer, read_sources(split_stdlib().heldout))
    return _HELDOUT_STREAMS[key]


def heldout_batches(tokenizer: Tokenizer, seq_len: int, max_batches: int, *,
                    batch_size: int = 4) -> list[torch.Tensor]:
    """Fixed held-out evaluation batches: ``max_batches`` LongTensors of shape (batch_size, seq_len).

    Deterministic for a given tokenizer and Python version: the windows are non-overlapping
    and evenly spaced over the encoded held-out files. Feed them to ``perplexity``.

    Example::

        batches = heldout_batches(lm.tokenizer, seq_len=128, max_batches=8)
        print(perplexity(lm.model, batches))
    """
    if seq_len < 2 or max_batches < 1 or batch_size < 1:
        raise FxforgeError(
            f"heldout_batches needs seq_len >= 2, max_batches >= 1 and batch_size >= 1 "
            f"(got {seq_len}, {max_batches}, {batch_size})."
        )
    stream = heldout_stream(tokenizer)
    windows = windows_evenly_spaced(stream, seq_len, max_batches * batch_size)
    return list(windows.split(batch_size))
