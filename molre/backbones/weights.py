"""Loading pretrained backbone weights from local files only.

Why this exists: the node runs next to a PACS without internet access, and pretrained weights
are licensed artefacts the site provides. So a weights reference is either a local file, a local
directory in the published Hugging Face layout (``config.json`` + ``model.safetensors``), or
``hf://<repo_id>[@revision]`` resolved *only* from the offline Hugging Face cache. Nothing is ever
downloaded at run time.

Keys are checked here rather than with ``load_state_dict(strict=False)`` (which silently ignores
problems): missing keys, unexpected keys and shape mismatches raise ``WeightsError`` listing the
offending keys. Published checkpoints often wrap the module (``model.``, ``encoder.``,
``module.`` from DDP, ``vision_model.`` for SigLIP, ...); the loader tries the known prefixes
and keeps the one under which the checkpoint matches the architecture best.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.errors import WeightsError
from common.log import get_logger

log = get_logger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
"""File types accepted as a weights file."""

DIR_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "model.pth",
)
"""Files looked for, in order, when the weights reference is a directory."""

KNOWN_PREFIXES = (
    "",
    "module.",
    "model.",
    "encoder.",
    "backbone.",
    "trunk.",
    "net.",
    "model.encoder.",
    "model.backbone.",
    "model.trunk.",
    "module.model.",
    "module.encoder.",
    "vision_model.",
    "model.vision_model.",
)
"""Prefixes stripped from checkpoint keys when that makes them match the architecture."""

_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_ema")
_LIST_LIMIT = 20


@dataclass
class LoadReport:
    """What a weights load did: where from, which prefix was stripped, what was dropped."""

    path: str
    prefix: str
    loaded: int
    ignored: list[str] = field(default_factory=list)
    config: dict | None = None


def _short_list(keys: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {head}{more}"


def resolve_weights(weights: str | Path, *, hint: str = "") -> Path:
    """Turn a weights reference into an existing local path, or explain how to provide it.

    ``hf://repo_id[@revision]`` is looked up in the offline Hugging Face cache only
    (``snapshot_download(..., local_files_only=True)``), never on the network.
    """
    how = f"\n  how to provide them: {hint}" if hint else ""
    ref = str(weights)
    if ref.startswith("hf://"):
        repo = ref[len("hf://") :].strip("/")
        revision = None
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        if not repo:
            raise WeightsError(
                f"weights reference {ref!r} names no repository (use hf://owner/name)"
            )
        try:
            from huggingface_hub import constants, snapshot_download
        except ImportError as exc:  # pragma: no cover - huggingface_hub ships with timm
            raise WeightsError(
                f"weights {ref!r}: huggingface_hub is not installed; pass a local path instead{how}"
            ) from exc
        try:
            local = snapshot_download(repo, revision=revision, local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ...
            raise WeightsError(
                f"weights {ref!r} are not in the offline Hugging Face cache "
                f"({constants.HF_HUB_CACHE}; set HF_HUB_CACHE/HF_HOME to use another). "
                f"Nothing is downloaded at run time: on a machine with internet run "
                f"`huggingface-cli download {repo} --local-dir <dir>` and pass that directory, "
                f"or copy the cache here.{how}"
            ) from exc
        return Path(local)
    path = Path(ref).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights file or directory not found: {path.resolve()} (looked for a "
            f"{'/'.join(WEIGHT_SUFFIXES)} file or a directory with {DIR_CANDIDATES[0]}).{how}"
        )
    return path


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common checkpoint containers (Lightning, DDP, EMA)."""
    for _ in range(3):
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())
        ):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
            )
            if inner is not None:
                obj = inner
                continue
        break
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise WeightsError(
        f"{path}: no tensor state dict found in the file (expected a mapping of names to tensors)"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix == ".json" and path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            shards = sorted(set(index.get("weight_map", {}).values()))
            if not shards:
                raise WeightsError(f"{path}: shard index has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = path.parent / shard
                if not shard_path.exists():
                    raise WeightsError(
                        f"{path}: shard {shard} listed in the index is missing in {path.parent}"
                    )
                state.update(_read_file(shard_path))
            return state
        if suffix in (".pt", ".pth", ".bin", ".ckpt"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            return _unwrap(obj, path)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    raise WeightsError(
        f"unsupported weights file type {path.name!r}; use one of {', '.join(WEIGHT_SUFFIXES)}"
    )


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path, dict | None]:
    """Read a state dict from a file or a published-layout directory.

    Returns ``(state, file_read, config)`` where ``config`` is the directory's ``config.json``
    (or None).
    """
    config = read_config(path)
    if path.is_dir():
        found = next((path / n for n in DIR_CANDIDATES if (path / n).exists()), None)
        if found is None:
            loose = sorted(p for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
            if len(loose) == 1:
                found = loose[0]
            else:
                raise WeightsError(
                    f"no weights file in directory {path} (looked for {', '.join(DIR_CANDIDATES)}"
                    + (
                        f"; several candidates: {', '.join(p.name for p in loose)} — pass one file"
                        if loose
                        else ""
                    )
                    + ")"
                )
        return _read_file(found), found, config
    return _read_file(path), path, config


def read_config(path: Path) -> dict | None:
    """The ``config.json`` of a published-layout weights directory, or None."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.exists()):
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{cfg}: not valid JSON ({exc})") from exc


def match_state_dict(
    state: Mapping[str, torch.Tensor],
    target: nn.Module,
    *,
    source: str = "weights",
    ignore: Iterable[str] = (),
    prefixes: Iterable[str] = KNOWN_PREFIXES,
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map checkpoint keys onto ``target``'s state dict keys, strictly.

    Tries each known prefix, keeps the one matching the most expected keys, and drops keys that
    match an ``ignore`` regex (e.g. the SigLIP text tower). Returns ``(state, prefix, ignored)``;
    raises ``WeightsError`` listing missing / unexpected / mis-shaped keys.
    """
    expected = target.state_dict()
    ignore_re = [re.compile(p) for p in ignore]

    best_prefix, best_hits = "", -1
    for prefix in prefixes:
        hits = sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in expected)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits

    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, value in state.items():
        if key.startswith(best_prefix) and key[len(best_prefix) :] in expected:
            mapped[key[len(best_prefix) :]] = value
        elif any(
            r.search(key) or (key.startswith(best_prefix) and r.search(key[len(best_prefix) :]))
            for r in ignore_re
        ):
            ignored.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in expected if k not in mapped]
    mismatched = [
        f"{k} (file {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in mapped
        if tuple(mapped[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_short_list(mismatched)}")
    if problems:
        strip = f" (after stripping prefix {best_prefix!r})" if best_prefix else ""
        raise WeightsError(
            f"{source} do not match the architecture{strip}: "
            + "; ".join(problems)
            + ". Check that the file belongs to this backbone (and its size variant)."
        )
    return mapped, best_prefix, ignored


def load_weights_into(
    target: nn.Module,
    weights: str | Path,
    *,
    hint: str = "",
    ignore: Iterable[str] = (),
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
) -> LoadReport:
    """Resolve, read, check and load ``weights`` into ``target`` (strict, after key mapping).

    ``convert`` (optional) rewrites a checkpoint in a foreign layout (e.g. Meta's original
    DINOv3 keys) before matching; it is only applied when a direct match fails.
    """
    path = resolve_weights(weights, hint=hint)
    state, file_read, config = read_weights(path)
    source = f"weights {file_read}"
    try:
        mapped, prefix, ignored = match_state_dict(state, target, source=source, ignore=ignore)
    except WeightsError:
        if convert is None:
            raise
        try:
            converted = convert(dict(state), target)
        except Exception:  # conversion not applicable: report the original mismatch
            converted = None
        if not converted:
            raise
        mapped, prefix, ignored = match_state_dict(converted, target, source=source, ignore=ignore)
        prefix = prefix or "(converted)"
    expected = target.state_dict()
    for k, v in mapped.items():
        if v.dtype != expected[k].dtype and expected[k].dtype.is_floating_point:
            mapped[k] = v.to(expected[k].dtype)
    target.load_state_dict(mapped, strict=True)
    log.info(
        "backbone_weights_loaded",
        path=str(file_read),
        tensors=len(mapped),
        prefix=prefix,
        ignored=len(ignored),
    )
    return LoadReport(
        path=str(file_read), prefix=prefix, loaded=len(mapped), ignored=ignored, config=config
    )
