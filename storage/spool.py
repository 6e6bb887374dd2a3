"""The spool: received instances on disk, written so that a crash never leaves a half file.

The receiver answers C-STORE Success only after the file is durable, so every write goes to a
temp file in the *same directory* (same filesystem, so the rename is atomic), is fsynced, renamed
over the final name, and the directory is fsynced so the rename itself survives a power cut. A
reader therefore sees either no file or the complete file under the final name. Temp files start
with ``.tmp-`` and are removed on failure and by :meth:`Spool.clean_temp` at start-up (what a
crash mid-write leaves behind).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from molre.errors import MolreError
from molre.log import get_logger

log = get_logger("storage.spool")

TEMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on dirs
        pass
    finally:
        os.close(fd)


class Spool:
    """A directory of received files addressed by relative paths (e.g. ``study/series/sop.dcm``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MolreError(f"spool directory {self.root} cannot be created ({exc.strerror}); "
                             "set the node's data dir to a writable location") from exc

    def path(self, relpath: str | Path) -> Path:
        """Absolute path of ``relpath``; refuses paths that would escape the spool root.

        UIDs from the network end up in file names, so ``..`` or absolute parts are rejected
        rather than trusted.
        """
        rel = Path(relpath)
        if rel.is_absolute() or any(part in ("..", "") for part in rel.parts) or not rel.parts:
            raise ValueError(f"spool path {str(relpath)!r} must be relative and stay inside "
                             "the spool")
        return self.root / rel

    def write_atomic(self, relpath: str | Path, data: bytes) -> Path:
        """Write ``data`` durably under ``relpath`` and return the final absolute path.

        An existing file of the same name is replaced atomically.
        """
        final = self.path(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return final

    def remove(self, path: str | Path) -> bool:
        """Delete a spooled file (absolute or relative to the root) and prune empty parent dirs.

        Returns False when the file was already gone; paths outside the spool are refused.
        """
        p = Path(path)
        p = p if p.is_absolute() else self.path(p)
        p = p.resolve()
        if self.root not in p.parents:
            raise ValueError(f"{p} is not inside the spool {self.root}")
        existed = p.exists()
        p.unlink(missing_ok=True)
        parent = p.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break
            parent = parent.parent
        return existed

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem (the receiver refuses work below a watermark)."""
        return shutil.disk_usage(self.root).free

    def clean_temp(self) -> int:
        """Remove temp files left by a crash during :meth:`write_atomic`; returns how many."""
        count = 0
        for tmp in self.root.rglob(TEMP_PREFIX + "*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                count += 1
        if count:
            log.info("spool temp files removed", count=count)
        return count

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"
