"""Weights read from safetensors files in place: memory-mapped, touched when used, dropped after.

A model loaded with `hf.from_pretrained(..., lazy=True)` is built with its parameters on the
meta device, then given tensors that are zero-copy views into memory maps of the directory's
`*.safetensors` files (sharded or not). Nothing is read until a computation touches a page, and
what was read is file-backed page cache, not memory this process owns: `drop_pages(t)` gives a
tensor's pages back (madvise MADV_DONTNEED), so a pass that walks the model block by block
(`fxforge.calibration.engine`) holds one block's weights at a time, whatever the model's size.

Why a reader of our own (about 60 lines) rather than `safetensors.safe_open`: `get_tensor`
copies each tensor out of the file, which is exactly the copy this module exists to avoid. The
header is JSON and the layout is the documented one (8-byte little-endian header length,
header, then raw little-endian data); only the header is parsed, nothing is executed.

The mappings are MAP_PRIVATE and writable (copy-on-write), so a stray in-place write changes
this process's copy, never the file; passes never write weights in place anyway
(`passes/cow.py` guards that contract).

`SpillStore` is the other direction: tensors a pass creates (a block's int4 codes) written to
disk block by block and replaced by views of what was written, so the rewritten model is no
more resident than the input was.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from fxforge.errors import ModelDirectoryError

__all__ = ["SafetensorsWeights", "SpillStore", "is_mapped", "drop_pages", "drop_all_pages", "mapped_bytes"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_PAGE = mmap.PAGESIZE

# [(first address, end address, mmap)] of every live mapping this module made: how a tensor is
# recognised as file-backed (its storage lies inside one) and how its pages are dropped.
_REGIONS: list[tuple[int, int, mmap.mmap]] = []
_LOCK = threading.Lock()


def _register(mm: mmap.mmap) -> int:
    base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if len(mm) else 0
    with _LOCK:
        _REGIONS.append((base, base + len(mm), mm))
    return base


def _region(address: int) -> tuple[int, int, mmap.mmap] | None:
    with _LOCK:
        for region in _REGIONS:
            if region[0] <= address < region[1]:
                return region
    return None


def is_mapped(t: torch.Tensor) -> bool:
    """Whether `t`'s data lies in a file mapping of this module (page cache, not owned memory)."""
    if t.device.type != "cpu" or not t.numel():
        return False
    return _region(t.untyped_storage().data_ptr()) is not None


def drop_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Give back the resident pages of file-mapped tensors (others are ignored); bytes covered.

    The data stays in the file (and usually the page cache): the next read faults it back in.
    """
    covered = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        start = t.untyped_storage().data_ptr()
        region = _region(start)
        if region is None:
            continue
        base, end, mm = region
        length = t.untyped_storage().nbytes()
        first = (start - base) // _PAGE * _PAGE
        last = min(end - base, -(-(start - base + length) // _PAGE) * _PAGE)
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):  # a mapping closed meanwhile: nothing resident to give back
            continue
        covered += length
    return covered


def drop_all_pages() -> None:
    """Give back the resident pages of every mapping this module made (between blocks: a
    rewritten block's old weights are no longer in its graph, so `drop_pages` of what the
    graph reads would miss the very pages the rewrite read)."""
    with _LOCK:
        regions = list(_REGIONS)
    for base, end, mm in regions:
        if end > base:
            try:
                mm.madvise(mmap.MADV_DONTNEED, 0, end - base)
            except (OSError, ValueError):
                continue


def mapped_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(file-mapped bytes, owned bytes) of distinct storages among `tensors`."""
    seen: dict[int, tuple[int, bool]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = (storage.nbytes(), is_mapped(t))
    mapped = sum(n for n, m in seen.values() if m)
    return mapped, sum(n for n, m in seen.values() if not m)


@dataclass(frozen=True)
class _Entry:
    file: int
    start: int   # byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ModelDirectoryError(f"{path} is not a safetensors file (shorter than its header); re-save the model")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:
            raise ModelDirectoryError(f"{path}: a safetensors header of {length} bytes is not plausible; the file is "
                                      f"damaged, re-save the model")
        header = json.loads(f.read(length))
    return 8 + length, header


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


class SafetensorsWeights:
    """The tensors of a model directory's safetensors files, as zero-copy views (see module doc).

    >>> weights = SafetensorsWeights("path/to/model")
    >>> w = weights.tensor("model.layers.0.mlp.down_proj.weight")   # nothing read yet
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        files = self._files()
        self._maps: list[mmap.mmap] = []
        self._entries: dict[str, _Entry] = {}
        for index, path in enumerate(files):
            data_start, header = _read_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ModelDirectoryError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which fxforge "
                                              f"does not read; convert the checkpoint to float32/bfloat16/float16")
                begin, _ = info["data_offsets"]
                self._entries[name] = _Entry(index, data_start + begin, _DTYPES[info["dtype"]], tuple(info["shape"]))
            mm = _map(path)
            _register(mm)
            self._maps.append(mm)

    def _files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            names = sorted(set(weight_map.values()))
            for name in names:  # names from a file: only plain file names inside the directory
                if Path(name).name != name:
                    raise ModelDirectoryError(f"{index} names the shard {name!r} outside the directory; re-save "
                                              f"the model")
            return [self.directory / name for name in names]
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelDirectoryError(f"{self.directory} has no *.safetensors weights, which lazy loading reads in "
                                      f"place; save the model with save_pretrained(..., safe_serialization=True) "
                                      f"or load it with lazy=False")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def dtypes(self) -> set[torch.dtype]:
        return {e.dtype for e in self._entries.values()}

    def nbytes(self) -> int:
        return sum(e.numel * torch.empty((), dtype=e.dtype).element_size() for e in self._entries.values())

    def tensor(self, name: str) -> torch.Tensor:
        """A view of tensor `name` in its file (reads nothing until used)."""
        entry = self._entries[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer: "non-writable" does not apply to ACCESS_COPY
            flat = torch.frombuffer(self._maps[entry.file], dtype=entry.dtype, count=entry.numel,
                                    offset=entry.start) if entry.numel else torch.empty(0, dtype=entry.dtype)
        return flat.view(entry.shape)


class SpillStore:
    """Tensors written to disk as they are produced and read back as file views.

    `spill({name: tensor})` writes one safetensors file (atomically) and returns views of it;
    the directory (under `FXFORGE_SPILL_DIR`, else the system's temporary directory) lives as
    long as this object, which a streamed graph keeps in its meta (shared by its copies).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._root = directory or os.environ.get("FXFORGE_SPILL_DIR") or None
        self._dir: tempfile.TemporaryDirectory | None = None  # made at the first spill
        self._count = 0
        self.spilled_bytes = 0
        self.peak_owned_bytes = 0  # see calibration/streaming.py
        self._keep: list[SafetensorsWeights] = []

    @property
    def path(self) -> Path:
        if self._dir is None:
            if self._root:
                Path(self._root).mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(prefix="fxforge-spill-", dir=self._root)
        return Path(self._dir.name)

    def __deepcopy__(self, memo: dict) -> "SpillStore":
        return self  # one store per streamed compile, shared by every copy of the graph

    def spill(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from safetensors.torch import save_file

        if not tensors:
            return {}
        part = self.path / f"part{self._count:05d}"
        part.mkdir()
        self._count += 1
        plain = {name: t.detach().contiguous() for name, t in tensors.items()}
        tmp = part / "spill.safetensors.tmp"
        save_file(plain, str(tmp))
        os.replace(tmp, part / "spill.safetensors")
        self.spilled_bytes += sum(t.numel() * t.element_size() for t in plain.values())
        del plain
        weights = SafetensorsWeights(part)
        self._keep.append(weights)
        return {name: weights.tensor(name) for name in tensors}
