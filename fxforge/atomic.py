"""All-or-nothing writes: a temporary sibling, completed, then renamed into place.

A save killed at any moment must leave either the previous file/directory or the new one,
never a mix. Everything is written into a temporary sibling of the target (same parent, so the
final rename is atomic on one file system), flushed to disk, and only then swapped in:

* a directory replaces an existing one with one `renameat2(RENAME_EXCHANGE)` on Linux (old and
  new trade places in a single step); where that is unavailable, old -> backup sibling,
  new -> target, backup deleted; a failure between the two renames moves the backup back;
* a file (plus companions such as ONNX external data) is written in a temporary sibling
  directory under its final name and moved with `os.replace`, companions first.

Siblings are named `.<target>.fxforge-tmp-<pid>-<hex>` (in progress) and
`.<target>.fxforge-old-<pid>-<hex>` (backup during a fallback swap). The next write to the same
target removes those whose process is gone; loaders never look at them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP = "tmp"
BACKUP = "old"
_SIBLING = re.compile(r"\.(?P<name>.+)\.fxforge-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")


def sibling(target: Path, kind: str) -> Path:
    """A fresh hidden path next to `target`, tagged with this process's id."""
    return target.parent / f".{target.name}.fxforge-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stale_siblings(target: Path, kind: str) -> list[Path]:
    """Siblings of `kind` that writers to `target` left behind and whose process is gone."""
    found = []
    if not target.parent.is_dir():
        return found
    for path in target.parent.iterdir():
        match = _SIBLING.fullmatch(path.name)
        if match and match["name"] == target.name and match["kind"] == kind and not _alive(int(match["pid"])):
            found.append(path)
    return found


def clean_stale_siblings(target: Path) -> None:
    """Remove what killed writes to `target` left: temporary siblings always, backups only when
    the target exists again (a backup without a target is the only copy of the old data)."""
    for path in stale_siblings(target, TEMP):
        _remove(path)
    if target.exists():
        for path in stale_siblings(target, BACKUP):
            _remove(path)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit it replaces `target` atomically.

    On an exception the temporary directory is removed and `target` is untouched. The caller
    decides beforehand whether `target` may be replaced (this function replaces whatever
    directory is there).
    """
    target = Path(target)
    staging = _new_staging(target)
    try:
        yield staging
        _fsync_tree(staging)
        _swap_in(staging, target)
    except BaseException:
        _remove(staging)
        raise
    _fsync_dir(target.parent)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a path with `target`'s file name inside a temporary sibling directory; on normal
    exit every file written there moves next to `target` (companions such as `model.onnx.data`
    first, `target` itself last), each with an atomic `os.replace`."""
    target = Path(target)
    staging = _new_staging(target)
    try:
        path = staging / target.name
        yield path
        if not path.is_file():
            raise FileNotFoundError(f"nothing was written to {target}")
        _fsync_tree(staging)
        companions = sorted(p for p in staging.iterdir() if p.name != target.name)
        for item in [*companions, path]:
            if item.is_dir():  # no writer of ours makes one; refuse rather than half-move it
                raise IsADirectoryError(f"unexpected directory {item.name} written next to {target}")
            os.replace(item, target.parent / item.name)
        _fsync_dir(target.parent)
    finally:
        _remove(staging)


def _new_staging(target: Path) -> Path:
    """An empty hidden sibling of `target` to write into (the parent made, stale leftovers cleaned)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(target)
    staging = sibling(target, TEMP)
    staging.mkdir()
    return staging


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)  # fails (not overwrites) if a non-empty target appeared
        return
    if _exchange(staging, target):
        _remove(staging)  # it now holds the previous contents
        return
    backup = sibling(target, BACKUP)
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _remove(backup)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # glibc < 2.28 or another libc
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: use the two-rename fallback
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync_tree(directory: Path) -> None:
    # Without this a power cut after the rename could expose a directory of empty files.
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
