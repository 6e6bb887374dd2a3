"""The spool: received instances on disk, written so that a crash never leaves a half file.

The receiver answers C-STORE Success only after the file is durable, so every write goes to a
temp file in the *same directory* (same filesystem, so the rename is atomic), is fsynced, renamed
over the final name, and the directory is fsynced so the rename itself survives a power cut. A
reader therefore sees either no file or the complete file under the final name. Temp files start
with ``.tmp-`` and are removed on failure and by :meth:`Spool.clean_temp` at start-up (what a
crash mid-write leaves behind).

Durability modes (``storage.durability`` in the node config, see docs/configuration.md):

- ``durable=True`` ("fsync", the default): file fsync, rename, directory fsync -- and the
  directory entries of directories this spool had to create are fsynced too, so a power cut
  right after C-STORE Success cannot make a new series directory (and everything in it)
  disappear. The spool is then the durable source of truth: SQLite may run with
  ``synchronous=NORMAL`` because a row lost to a power cut is rebuilt from the file at start-up
  (``node.receiver.reconcile_spool``).
- ``durable=False`` (the receiver's "os" mode, passed per call): same temp-file + rename
  protocol, no fsync. The data is in the kernel's page cache when Success is answered, so it
  survives a crash or ``kill -9`` of the node process, but not a power cut or kernel crash
  within the kernel's write-back delay (~30 s).

Why both fsyncs: the file's fsync makes its bytes durable *before* its final name exists, so a
power cut can never leave a final name over half a file (reconciliation would otherwise index
the torn file, and the sender's resend would then look like a conflict); the directory's fsync
makes the rename itself durable. ``fdatasync`` instead of ``fsync`` saves nothing for a new
file (its size and blocks are metadata the data needs), and on ext4 it measured the same.

:meth:`Spool.stage` is the receiver's variant of :meth:`Spool.write_atomic`: the temp file is
written (and fsynced) by a spool I/O thread under ``incoming/`` while the receiver parses the
header, which decides the final name; :meth:`StagedFile.commit` then renames it into place and
fsyncs the target directory. The I/O (``write``/``fsync`` release the GIL) thus overlaps the
parsing instead of following it. Non-durable staging writes inline: a page-cache write is
shorter than the handoff to the thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from common.errors import MolreError
from common.log import get_logger

log = get_logger("storage.spool")

TEMP_PREFIX = ".tmp-"
#: Where :meth:`Spool.stage` writes temp files (same file system as the final names).
INCOMING = "incoming"
#: Spool I/O threads for :meth:`Spool.stage` (one write in flight per receiving association).
IO_THREADS = 4

Chunks = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


def _write_all(fd: int, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
    """``writev`` every chunk (no joined copy of a large payload), resuming short writes."""
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


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

    def __init__(self, root: str | Path, *, durable: bool = True) -> None:
        self.durable = bool(durable)
        # directories known to exist (and, when durable, to have a durable entry in their parent)
        self._known_dirs: set[Path] = set()
        # directories created here whose entry in their parent is not fsynced yet
        self._new_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None  # started by the first stage()
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MolreError(
                f"spool directory {self.root} cannot be created ({exc.strerror}); "
                "set the node's data dir to a writable location"
            ) from exc

    def path(self, relpath: str | Path) -> Path:
        """Absolute path of ``relpath``; refuses paths that would escape the spool root.

        UIDs from the network end up in file names, so ``..`` or absolute parts are rejected
        rather than trusted.
        """
        rel = Path(relpath)
        if rel.is_absolute() or any(part in ("..", "") for part in rel.parts) or not rel.parts:
            raise ValueError(
                f"spool path {str(relpath)!r} must be relative and stay inside the spool"
            )
        return self.root / rel

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` and missing parents; remember the new ones, whose entries in
        their parents :meth:`_sync_new_dirs` makes durable (fsyncing only the file's own
        directory does not make that directory's entry in *its* parent durable)."""
        if directory in self._known_dirs:
            return
        missing: list[Path] = []
        d = directory
        while d != self.root and not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another thread/process created it meanwhile
                pass
            with self._dir_lock:
                self._new_dirs.add(d)
        if len(self._known_dirs) > 10000:  # one entry per series directory: keep it bounded
            self._known_dirs.clear()
        self._known_dirs.add(directory)

    def _sync_new_dirs(self) -> None:
        with self._dir_lock:  # receiver threads write concurrently
            pending = sorted(self._new_dirs, key=lambda x: len(x.parts), reverse=True)
        for d in pending:
            _fsync_dir(d.parent)
        with self._dir_lock:
            self._new_dirs.difference_update(pending)

    def write_atomic(
        self, relpath: str | Path, data: Chunks, *, durable: bool | None = None
    ) -> Path:
        """Write ``data`` (bytes, or a sequence of chunks written in order) under ``relpath``
        and return the final absolute path. Durable (fsync) unless the spool or this call says
        otherwise; see the module docstring.

        An existing file of the same name is replaced atomically.
        """
        durable = self.durable if durable is None else bool(durable)
        final = self.path(relpath)
        try:
            self._ensure_dir(final.parent)
            tmp = self._write_temp(final.parent, data, durable)
        except FileNotFoundError:  # the directory was pruned after we cached it: create again
            self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            tmp = self._write_temp(final.parent, data, durable)
        return self._install(tmp, final, durable)

    def stage(self, data: Chunks, *, durable: bool | None = None) -> "StagedFile":
        """Start writing ``data`` to a temp file under ``incoming/`` in an I/O thread (fsynced;
        inline when not durable) and return at once; :meth:`StagedFile.commit` gives it its
        final name.

        Why: the receiver learns the final name only from the header it is still parsing; the
        write and its fsync need no GIL, so they run meanwhile instead of afterwards."""
        durable = self.durable if durable is None else bool(durable)
        with self._dir_lock:
            if self._io is None:
                (self.root / INCOMING).mkdir(exist_ok=True)
                self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="spool-io")
            io = self._io
        if durable:
            return StagedFile(
                self, io.submit(self._write_temp, self.root / INCOMING, data, True), durable
            )
        # no fsync to overlap: a page-cache write is shorter than the thread handoff, whose
        # Python parts would compete for the GIL with the header parse anyway
        done: Future[Path] = Future()
        try:
            done.set_result(self._write_temp(self.root / INCOMING, data, False))
        except BaseException as exc:  # noqa: BLE001 - re-raised by StagedFile.commit
            done.set_exception(exc)
        return StagedFile(self, done, durable)

    @staticmethod
    def _write_temp(directory: Path, data: Chunks, durable: bool) -> Path:
        """A new temp file in ``directory`` holding ``data`` (fsynced when durable); removed
        again if anything fails."""
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=directory)
        chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            try:
                _write_all(fd, chunks)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return Path(tmp_name)

    def _install(self, tmp: Path, final: Path, durable: bool) -> Path:
        """Rename a written temp file to ``final``; when durable, fsync the directory (and the
        entries of directories created for it) so the rename survives a power cut."""
        try:
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # staged file, target directory missing or pruned
                self._known_dirs.discard(final.parent)
                self._ensure_dir(final.parent)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            _fsync_dir(final.parent)
            if self._new_dirs:
                self._sync_new_dirs()
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
        self._prune_empty_dirs(p.parent)
        return existed

    def remove_if_same(self, path: str | Path, identity: tuple[int, int] | None) -> str:
        """Delete a spooled file only if it is still the file ``identity`` (:func:`file_identity`)
        was taken of; prune empty parent dirs. Returns "removed", "missing" or "changed".

        Why: ``audit prune`` decides under the database lock which files go, and deletes them
        after its commit. A resend of the same study may meanwhile have written a *new* file
        under the same name (its row no longer exists, so it is stored as new) -- that file
        was acknowledged and must stay. Every write here is a new inode (temp file + rename),
        so the inode tells the two apart: the file is moved aside atomically, checked, and
        put back if a newer one had taken the name."""
        p = Path(path)
        p = p if p.is_absolute() else self.path(p)
        if self.root not in p.resolve().parents:
            raise ValueError(f"{p} is not inside the spool {self.root}")
        outcome = remove_if_same(p, identity)
        if outcome == "removed":
            self._prune_empty_dirs(p.parent)
        return outcome

    def _prune_empty_dirs(self, parent: Path) -> None:
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break
            self._known_dirs.discard(parent)
            parent = parent.parent

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem (the receiver refuses work below a watermark)."""
        return shutil.disk_usage(self.root).free

    def clean_temp(self, min_age_s: float = 0.0) -> int:
        """Remove temp files left by a crash during :meth:`write_atomic`; returns how many.

        ``min_age_s`` > 0 (a spool shared by several nodes): only temp files not modified for
        that long -- a file another node is writing right now is young and stays."""
        import time

        count = 0
        cutoff = time.time() - min_age_s
        for tmp in self.root.rglob(TEMP_PREFIX + "*"):
            try:
                if not tmp.is_file() or (min_age_s > 0 and tmp.stat().st_mtime > cutoff):
                    continue
            except OSError:  # removed meanwhile (by its writer's rename)
                continue
            tmp.unlink(missing_ok=True)
            count += 1
        if count:
            log.info("spool temp files removed", count=count)
        return count

    def close(self) -> None:
        """Wait for staged writes still in flight and stop the I/O threads."""
        with self._dir_lock:
            io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def remove_if_same(path: str | Path, identity: tuple[int, int] | None) -> str:
    """Delete ``path`` if it is still the file of ``identity``: "removed", "missing" (nothing
    there, or nothing was there when the identity was taken) or "changed" (a newer file has the
    name: kept). See :meth:`Spool.remove_if_same`."""
    p = Path(path)
    if identity is None:
        return "missing"
    now = file_identity(p)
    if now is None:
        return "missing"
    if now != identity:
        return "changed"
    aside = p.with_name(f"{TEMP_PREFIX}prune-{p.name}")  # clean_temp removes it after a crash
    try:
        os.rename(p, aside)
    except FileNotFoundError:
        return "missing"
    if file_identity(aside) != identity:
        # replaced between the check and the rename: the newer file goes back under its name
        # (unless an even newer one is there already), ours was never moved
        try:
            os.link(aside, p)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return "changed"
    aside.unlink(missing_ok=True)
    return "removed"


class StagedFile:
    """A file :meth:`Spool.stage` is writing; use as a context manager so that a file that was
    not committed (rejected, duplicate, error) is removed once its write finishes."""

    def __init__(self, spool: Spool, future: "Future[Path]", durable: bool) -> None:
        self._spool = spool
        self._future = future
        self._durable = durable
        self._done = False

    def commit(self, relpath: str | Path) -> Path:
        """Wait for the write (re-raising its error), then rename the file to ``relpath``;
        durable (directory fsynced) when staged durable. Returns the final path."""
        final = self._spool.path(relpath)
        self._spool._ensure_dir(final.parent)
        tmp = self._future.result()
        self._done = True
        return self._spool._install(tmp, final, self._durable)

    def discard(self) -> None:
        """Drop the file without waiting for its write to finish (idempotent)."""
        if self._done:
            return
        self._done = True

        def unlink(f: "Future[Path]") -> None:
            if not f.cancelled() and f.exception() is None:
                f.result().unlink(missing_ok=True)

        self._future.add_done_callback(unlink)

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()
