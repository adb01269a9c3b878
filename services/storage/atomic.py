"""Files written whole or not at all: the one way this app replaces a file.

A crash, a kill or a full disk mid-write leaves the old file or the new one, never a torn one:
the bytes go to a temporary file in the same folder, are flushed to disk (fsync), the temp file
is renamed over the target (atomic on POSIX), and the folder itself is synced so the rename
survives a power cut. A failed write removes its temp file; a killed one may leave a
``.<name>.*.tmp`` beside the target, which nothing reads.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(path: Path | str, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to (by any writer: PIL, zipfile, ...);
    on leaving the block without an error it replaces ``path``. ``mode``: its permission bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> None:
    with replacing(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str, *, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: Path | str, data: Any, **dumps: Any) -> None:
    write_text(path, json.dumps(data, **dumps))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) can't open a folder: the rename is done anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
