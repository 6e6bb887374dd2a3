"""Cache of preprocessed volumes: one tensor file per (series, backbone recipe).

Why: reading a DICOM series and resampling / windowing / cropping it is the training bottleneck
(tens of ms to seconds per series); a backbone's recipe output is the same every epoch. So each
series is preprocessed once into ``<cache-dir>/<recipe.cache_key()>/<series-key>.pt`` and epochs
read those files.

The series key is a hash of the source's absolute path and a cheap signature of its files (count,
total size, newest mtime), so an edited or re-exported series is preprocessed again rather than
served stale. Writes go to a temporary file and are renamed into place (atomic): a killed run never
leaves a truncated tensor that a later run would trust. A series that cannot be read is reported
with its reason and skipped; only when *every* series fails is it an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from common.errors import MolreError
from common.log import get_logger
from common.procs import process_pool

__all__ = ["CacheReport", "VolumeCache", "series_key"]

log = get_logger("molre.cache")


def _signature(source: Path) -> str:
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.is_file()]
    elif source.exists():
        files = [source]
    else:
        return "missing"
    size = 0
    newest = 0
    for p in files:
        st = p.stat()
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return f"{len(files)}:{size}:{newest}"


def series_key(source: str | Path) -> str:
    """Stable key of a series source (directory of DICOM files, or one NIfTI file)."""
    p = Path(source).expanduser().resolve()
    h = hashlib.sha256(f"{p}|{_signature(p)}".encode("utf-8"))
    return h.hexdigest()[:32]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _preprocess_one(
    source: str, recipe_dict: dict, target: str
) -> tuple[str, str | None, list[str]]:
    """Worker: read + preprocess + write. Returns (source, error or None, reader warnings)."""
    from molre.data.preprocess import Recipe
    from molre.data.volume import read_volume

    try:
        vol = read_volume(Path(source))
        x = Recipe.from_dict(recipe_dict)(vol)
        if not torch.isfinite(x).all():
            return source, "preprocessed tensor has non-finite values", []
        _atomic_torch_save(x.contiguous().clone(), Path(target))
        return source, None, list(getattr(vol, "warnings", []) or [])
    except MolreError as exc:
        return source, str(exc), []
    except Exception as exc:  # an unexpected reader failure on one series must not stop the run
        return source, f"{type(exc).__name__}: {exc}", []


@dataclass
class CacheReport:
    """Where each source's tensor lives, and which sources failed (with the reason)."""

    paths: dict[str, Path] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    built: int = 0
    reused: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "ok": len(self.paths),
            "failed": len(self.failures),
            "built": self.built,
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "failures": dict(self.failures),
        }


class VolumeCache:
    """Preprocessed tensors of one recipe under `root/<recipe.cache_key()>/`."""

    def __init__(self, root: str | Path, recipe: Any) -> None:
        self.recipe = recipe
        self.root = Path(root).expanduser()
        self.dir = self.root / recipe.cache_key()

    def path_for(self, source: str | Path) -> Path:
        return self.dir / f"{series_key(source)}.pt"

    def load(self, path: str | Path) -> torch.Tensor:
        return torch.load(path, map_location="cpu", weights_only=True)

    def get(self, source: str | Path) -> torch.Tensor | None:
        p = self.path_for(source)
        return self.load(p) if p.is_file() else None

    def _write_recipe(self) -> None:
        meta = self.dir / "recipe.json"
        if not meta.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_suffix(".json.tmp")
            tmp.write_text(
                json.dumps(self.recipe.to_dict(), indent=2, default=str), encoding="utf-8"
            )
            os.replace(tmp, meta)

    def build(
        self,
        sources: Sequence[str | Path],
        workers: int = 0,
        progress: bool = True,
        allow_all_failed: bool = False,
    ) -> CacheReport:
        """Make sure every source has a cached tensor; preprocess the missing ones.

        `workers` > 0 preprocesses in that many processes. Raises MolreError when every source
        failed (listing the first reasons), unless `allow_all_failed`.
        """
        t0 = time.perf_counter()
        self._write_recipe()
        report = CacheReport()
        todo: list[tuple[str, Path]] = []
        for src in sources:
            s = str(Path(src))
            p = self.path_for(s)
            if p.is_file():
                report.paths[s] = p
                report.reused += 1
            else:
                todo.append((s, p))
        if todo:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(todo),
                desc=f"cache {self.dir.name[:12]}",
                unit="series",
                disable=not progress,
                leave=False,
            )
            recipe_dict = self.recipe.to_dict()
            results: list[tuple[str, str | None, list[str]]] = []
            if workers and workers > 0 and len(todo) > 1:
                with process_pool(workers) as pool:
                    futs = {
                        pool.submit(_preprocess_one, s, recipe_dict, str(p)): s for s, p in todo
                    }
                    for fut in as_completed(futs):
                        results.append(fut.result())
                        bar.update(1)
            else:
                for s, p in todo:
                    results.append(_preprocess_one(s, recipe_dict, str(p)))
                    bar.update(1)
            bar.close()
            target = dict(todo)
            for s, err, warns in results:
                if err is None:
                    report.paths[s] = target[s]
                    report.built += 1
                    if warns:
                        log.info("cache.series_warnings", source=s, warnings=warns[:3])
                else:
                    report.failures[s] = err
                    log.warning("cache.series_skipped", source=s, reason=err)
        report.seconds = time.perf_counter() - t0
        if sources and not report.paths and not allow_all_failed:
            first = "; ".join(f"{k}: {v}" for k, v in list(report.failures.items())[:3])
            raise MolreError(
                f"none of the {len(sources)} series could be preprocessed "
                f"(first reasons: {first}); check the manifest paths and the data"
            )
        log.info(
            "cache.ready",
            dir=str(self.dir),
            ok=len(report.paths),
            built=report.built,
            reused=report.reused,
            failed=len(report.failures),
            seconds=round(report.seconds, 2),
        )
        return report
