"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[Any]], Any]


def atomic_write(
    path: str | Path,
    data: bytes | str | Writer,
    *,
    binary: bool | None = None,
    mode: int = 0o644,
    encoding: str = "utf-8",
) -> Path:
    """Write `data` (bytes, text, or a function that writes to the open file: a text file
    unless ``binary=True``) to a temp file
    in `path`'s folder (same filesystem: the rename is atomic), fsync it, give it `mode`
    (mkstemp's 0600 would hide shared data from other users) and rename it over `path`.
    The temp file is removed if anything fails. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if binary is None:
            binary = isinstance(data, (bytes, bytearray))
        stream: IO[Any] = (
            os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding, newline="")
        )
        with stream as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["atomic_write"]
