"""Checkpoints: adapter + head tensors (safetensors) and a JSON model card, and the node's Predictor.

A checkpoint is a directory:

- `adapter.safetensors` — adapter, router, pooling and head tensors only. Never the backbone's
  base weights: those are large, licensed separately and already on the site; the card records
  their `weights_digest` so loading can prove the same base weights are used.
- `model.json` — the model card (format version, backbone name + digest + source, adapter config,
  full finding catalog, preprocessing recipe, per-finding decision thresholds, training summary,
  metrics, intended use / disclaimer).
- optionally `backbone.safetensors` — the base weights of a *small* random-init backbone (the demo
  `tiny-3d`), so the digest check does not depend on the RNG stream of a torch version.

`checkpoint_hash` is the sha256 of the tensors (name, dtype, shape, bytes; sorted by name) and of the
canonical JSON of the card: it identifies exactly what produced a result and is written into
every SR and audit row by the node.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.errors import CheckpointError, MolreError, WeightsError
from common.fs import atomic_write
from common.jsonsafe import json_default
from common.log import get_logger
from molre import __version__

__all__ = [
    "CARD_FORMAT_VERSION",
    "ADAPTER_FILE",
    "CARD_FILE",
    "BACKBONE_FILE",
    "DEFAULT_INTENDED_USE",
    "DEMO_DISCLAIMER",
    "LoadedCheckpoint",
    "Prediction",
    "Predictor",
    "checkpoint_hash",
    "default_checkpoint_path",
    "load_card",
    "load_checkpoint",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "trainable_state_dict",
]

CARD_FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
CARD_FILE = "model.json"
BACKBONE_FILE = "backbone.safetensors"

DEFAULT_INTENDED_USE = (
    "Research use: triage support on non-contrast head CT. Outputs are probabilities per finding "
    "and must be reviewed by a qualified radiologist; not a diagnosis."
)
DEMO_DISCLAIMER = (
    "DEMO MODEL - synthetic training data - not for clinical use. Trained on procedurally "
    "generated phantoms to exercise the pipeline end to end; its outputs carry no medical meaning."
)

log = get_logger("molre.checkpoint")


# --------------------------------------------------------------------------------------------
# hashing and file helpers
# --------------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True
    ).encode("utf-8")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def checkpoint_hash(tensors: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> str:
    """sha256 over the tensors (sorted by name: name, dtype, shape, bytes) and the card's canonical
    JSON. Independent of how safetensors lays out the file, so re-saving the same content gives the
    same hash."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode("ascii"))
        h.update(str(tuple(t.shape)).encode("ascii"))
        h.update(_tensor_bytes(t))
    h.update(_canonical_json(dict(card)))
    return h.hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, save(clean, metadata={"format": "pt"}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # corrupt / truncated file
        raise CheckpointError(
            f"{path}: cannot read tensors ({exc}); the file is damaged — "
            "copy the checkpoint again or retrain"
        ) from exc


# --------------------------------------------------------------------------------------------
# which tensors belong in a checkpoint
# --------------------------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter (+router) tensors, plus everything of the model that is not the backbone (pooling,
    head). Backbone base weights are left out on purpose (see module docstring). Defined once,
    in ``molre.model.trainable_state_dict``."""
    from molre.model import trainable_state_dict as _trainable

    return _trainable(model)


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    card: Mapping[str, Any],
    backbone_state: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Write `adapter.safetensors` + `model.json` (and `backbone.safetensors` when
    `backbone_state` is given) into `directory`; return the checkpoint hash.

    Missing standard card fields are filled (format version, package version, created time,
    intended use / disclaimer). Files are written atomically so a crash never leaves a
    half-written checkpoint that the node would load.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = json.loads(json.dumps(dict(card), default=json_default))
    card.setdefault("format_version", CARD_FORMAT_VERSION)
    card.setdefault("package_version", __version__)
    card.setdefault("created", _now())
    card.setdefault("is_demo", False)
    card.setdefault("intended_use", DEFAULT_INTENDED_USE)
    if card["is_demo"]:
        card.setdefault("disclaimer", DEMO_DISCLAIMER)
    else:
        card.setdefault(
            "disclaimer", "Not a medical device. Validate on local data before any use."
        )
    for req in ("backbone", "catalog", "recipe", "adapter"):
        if req not in card:
            raise ValueError(f"model card lacks required field {req!r}")
    tensors = trainable_state_dict(model)
    if backbone_state is not None:
        _save_tensors(directory / BACKBONE_FILE, backbone_state)
        card["backbone"] = dict(card["backbone"], weights_file=BACKBONE_FILE)
    _save_tensors(directory / ADAPTER_FILE, tensors)
    digest = checkpoint_hash(tensors, card)
    atomic_write(
        directory / CARD_FILE, (json.dumps(card, indent=2, sort_keys=False) + "\n").encode("utf-8")
    )
    log.info(
        "checkpoint.saved", path=str(directory), checkpoint_hash=digest[:16], tensors=len(tensors)
    )
    return digest


def default_checkpoint_path() -> Path:
    """The packaged demo checkpoint (tiny-3d + MoLRE, trained on synthetic phantoms)."""
    return Path(__file__).resolve().parent / "resources" / "demo"


#: The name every command accepts for the packaged demo checkpoint (`--checkpoint demo`,
#: `checkpoint = "demo"` in the node config), unless a folder of that name exists.
DEMO_NAME = "demo"


def resolve_checkpoint_dir(path: str | Path | None) -> Path:
    """Accept a checkpoint dir, a training run dir (uses `best/`, else `last/`) or a `model.json`
    path; None or "demo" = the packaged demo. Raises CheckpointError saying where it looked."""
    if path is not None and str(path) == DEMO_NAME and not Path(DEMO_NAME).exists():
        path = None
    if path is None:
        p = default_checkpoint_path()
        if not (p / CARD_FILE).is_file():
            raise CheckpointError(
                f"the packaged demo checkpoint is missing ({p / CARD_FILE}); regenerate it with "
                "`python -m molre.demo_checkpoint --out molre/resources/demo` or pass a checkpoint"
            )
        return p
    p = Path(path).expanduser()
    if p.is_file() and p.name == CARD_FILE:
        p = p.parent
    looked = [p / CARD_FILE]
    if (p / CARD_FILE).is_file():
        return p
    for sub in ("best", "last"):
        looked.append(p / sub / CARD_FILE)
        if (p / sub / CARD_FILE).is_file():
            return p / sub
    raise CheckpointError(
        "no checkpoint found: looked for "
        + ", ".join(str(x) for x in looked)
        + " — pass a checkpoint directory (with model.json and adapter.safetensors) or a training "
        "run directory (with best/ or last/)"
    )


def assessed_findings(card: Mapping[str, Any]) -> list[str]:
    """The findings a checkpoint has validation evidence for, in catalog order.

    A card may list them (``assessed_findings``); otherwise they are the findings whose
    validation AUC was computable (labelled positives and negatives in the validation split).
    A card without validation metrics (hand-made, very old) assesses its whole catalog. The node
    reports only these: a finding the model was never validated on is "not assessed", never
    "Present".
    """
    keys = [f["key"] for f in card.get("catalog", {}).get("findings", [])]
    explicit = card.get("assessed_findings")
    if explicit is not None:
        return [k for k in keys if k in set(explicit)]
    auc = (card.get("metrics") or {}).get("auc")
    if not auc:
        return keys
    return [k for k in keys if auc.get(k) is not None]


def load_card(path: str | Path | None) -> dict[str, Any]:
    """Read and validate the model card of a checkpoint (no tensors, no model)."""
    d = resolve_checkpoint_dir(path)
    try:
        card = json.loads((d / CARD_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{d / CARD_FILE}: not valid JSON ({exc}); the card is damaged"
        ) from exc
    fv = card.get("format_version")
    if fv != CARD_FORMAT_VERSION:
        raise CheckpointError(
            f"{d / CARD_FILE}: format_version {fv!r} is not supported (this molre reads "
            f"{CARD_FORMAT_VERSION}); use the molre version that wrote it or retrain"
        )
    for req in ("backbone", "catalog", "recipe", "adapter"):
        if req not in card:
            raise CheckpointError(f"{d / CARD_FILE}: required field {req!r} is missing")
    return card


@dataclass
class LoadedCheckpoint:
    """A ready model (eval mode, on `device`) with everything the card says about it."""

    model: nn.Module
    card: dict[str, Any]
    catalog: Any
    recipe: Any
    checkpoint_hash: str
    path: Path
    thresholds: dict[str, float] = field(default_factory=dict)


def _catalog_mismatch(expected: Any, actual: Any) -> str:
    ek, ak = list(expected.keys), list(actual.keys)
    missing = [k for k in ek if k not in ak]
    extra = [k for k in ak if k not in ek]
    parts = []
    if missing:
        parts.append(
            f"findings missing from the checkpoint: {', '.join(missing[:10])}"
            + (" …" if len(missing) > 10 else "")
        )
    if extra:
        parts.append(
            f"findings only in the checkpoint: {', '.join(extra[:10])}"
            + (" …" if len(extra) > 10 else "")
        )
    if not missing and not extra:
        if ek != ak:
            parts.append("the same findings in a different order")
        else:
            diff = [fe.key for fe, fa in zip(expected, actual) if fe != fa]
            parts.append(
                "finding definitions differ (codes/names/categories) for: " + ", ".join(diff[:10])
            )
    return "; ".join(parts)


def _build_backbone(
    card: Mapping[str, Any], ckpt_dir: Path, weights: str | Path | None
) -> nn.Module:
    from molre.backbones import create_backbone

    bb = card["backbone"]
    name = bb["name"]
    wfile = bb.get("weights_file")
    seed = bb.get("init_seed")
    if weights is None and wfile:
        path = ckpt_dir / wfile
        if not path.is_file():
            raise CheckpointError(
                f"{path}: backbone base weights named by the card are missing; "
                "copy the whole checkpoint directory"
            )
        with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG stream
            if seed is not None:
                torch.manual_seed(int(seed))
            module = create_backbone(name)
        state = _load_tensors(path)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path}: backbone weights do not fit backbone {name!r}: {exc}"
            ) from exc
        return module
    if weights is None and str(bb.get("weights_source") or "").startswith("packaged:"):
        return create_backbone(name)  # weights shipped with the package; the digest is checked
    if weights is None:
        src = bb.get("weights_source")
        if src and src not in ("random", "random-init") and Path(str(src)).exists():
            weights = src
        elif src and str(src).startswith("hf://"):  # offline HF cache only, never downloads
            from molre.backbones import resolve_weights

            try:
                resolve_weights(str(src))
                weights = src
            except WeightsError:
                pass  # not cached here: the error below says how to pass the weights
    if weights is None and seed is None:
        raise WeightsError(
            f"checkpoint {ckpt_dir} was trained on backbone {name!r} with weights from "
            f"{bb.get('weights_source')!r}, which is not available here; pass the local weights "
            "(--weights PATH / [model] weights in the config)"
        )
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return create_backbone(name)
    return create_backbone(name, weights=weights)


def load_checkpoint(
    directory: str | Path | None,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    catalog: Any | None = None,
) -> LoadedCheckpoint:
    """Rebuild backbone + adapters + head from a checkpoint and verify it.

    Checks, each with a CheckpointError that names the mismatch: the backbone's base weights
    digest equals the card's; the card's catalog is intact (digest) and, when `catalog` is given
    (e.g. the site catalog the node is configured with), equal to it; the tensor file has exactly
    the tensors the model expects.
    """
    from molre.adapters import MoLREConfig, adapted_layers
    from molre.adapters.names import remap_legacy_keys
    from molre.backbones import weights_digest
    from molre.catalog import Catalog
    from molre.data.preprocess import Recipe
    from molre.model import build_model

    d = resolve_checkpoint_dir(directory)
    card = load_card(d)
    if not (d / ADAPTER_FILE).is_file():
        raise CheckpointError(
            f"{d / ADAPTER_FILE} is missing; a checkpoint needs both {ADAPTER_FILE} and {CARD_FILE}"
        )
    ckpt_catalog = Catalog.from_dict(card["catalog"])
    want_cat = card.get("catalog_digest")
    if want_cat and ckpt_catalog.digest() != want_cat:
        raise CheckpointError(
            f"{d / CARD_FILE}: catalog content does not match its recorded "
            "catalog_digest; the card was edited or damaged"
        )
    if catalog is not None and catalog.digest() != ckpt_catalog.digest():
        raise CheckpointError(
            f"checkpoint {d} was trained for a different finding catalog than the one configured "
            f"(catalog digest {ckpt_catalog.digest()[:12]} in the checkpoint vs "
            f"{catalog.digest()[:12]} configured): {_catalog_mismatch(catalog, ckpt_catalog)}. "
            "Use the checkpoint's catalog or retrain for this catalog."
        )

    backbone = _build_backbone(card, d, weights)
    want = card["backbone"].get("weights_digest")
    got = weights_digest(backbone)
    if want and got != want:
        raise CheckpointError(
            f"backbone weights digest mismatch for {card['backbone']['name']!r}: the checkpoint "
            f"{d} was trained on base weights {want[:16]}… but the weights loaded "
            f"({weights or card['backbone'].get('weights_file') or card['backbone'].get('weights_source')}) "
            f"have digest {got[:16]}…; use the same backbone weights file that was used in training"
        )

    ad = card["adapter"]
    cfg = (
        MoLREConfig.from_dict(ad["config"])
        if ad.get("type", "none") != "none" and ad.get("config")
        else None
    )
    model = build_model(backbone, ckpt_catalog, cfg)
    stored = _load_tensors(d / ADAPTER_FILE)
    # checkpoints written before the PEFT names (base/lora_down/lora_up) load under the new ones;
    # the hash stays that of the tensors as stored
    tensors = remap_legacy_keys(stored, adapted_layers(model))
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{d / ADAPTER_FILE} does not fit the model described by {CARD_FILE}: "
            f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    for k, v in tensors.items():
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{d / ADAPTER_FILE}: tensor {k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    model.to(device)
    model.eval()
    recipe = Recipe.from_dict(card["recipe"])
    thresholds = {
        k: float(card.get("thresholds", {}).get(k, {}).get("value", 0.5)) for k in ckpt_catalog.keys
    }
    return LoadedCheckpoint(
        model=model,
        card=card,
        catalog=ckpt_catalog,
        recipe=recipe,
        checkpoint_hash=checkpoint_hash(stored, card),
        path=d,
        thresholds=thresholds,
    )


# --------------------------------------------------------------------------------------------
# inference for the node
# --------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What the node reports for one series."""

    probabilities: dict[str, float]
    decisions: dict[str, bool]
    checkpoint_hash: str
    model_name: str
    model_version: str
    is_demo: bool
    used_sop_instance_uids: list[str]
    thresholds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    not_assessed: list[str] = field(default_factory=list)  # catalog findings without evidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "not_assessed": self.not_assessed,
            "probabilities": self.probabilities,
            "decisions": self.decisions,
            "thresholds": self.thresholds,
            "checkpoint_hash": self.checkpoint_hash,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "is_demo": self.is_demo,
            "used_sop_instance_uids": self.used_sop_instance_uids,
            "warnings": self.warnings,
        }


class Predictor:
    """Loads a checkpoint once and turns series on disk into per-finding probabilities.

    The node keeps one Predictor per worker; it is not thread-safe for concurrent calls on the
    same instance (torch modules are not), so the worker serialises calls.
    """

    def __init__(self, loaded: LoadedCheckpoint, device: str | torch.device = "cpu") -> None:
        self._loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model
        self.catalog = loaded.catalog
        self.card = loaded.card
        self.recipe = loaded.recipe
        self.checkpoint_hash = loaded.checkpoint_hash
        self.thresholds = dict(loaded.thresholds)
        self.path = loaded.path
        self.assessed = assessed_findings(self.card)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        weights: str | Path | None = None,
        catalog: Any | None = None,
    ) -> "Predictor":
        """None = the packaged demo checkpoint."""
        return cls(load_checkpoint(path, device=device, weights=weights, catalog=catalog), device)

    @property
    def model_name(self) -> str:
        return str(self.card.get("model_name") or f"molre-{self.card['backbone']['name']}")

    @property
    def model_version(self) -> str:
        return str(self.card.get("model_version") or f"{__version__}+{self.checkpoint_hash[:8]}")

    @property
    def is_demo(self) -> bool:
        return bool(self.card.get("is_demo", False))

    def predict_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities (B, F) for a preprocessed batch (B, ...) or a single sample (...)."""
        if x.dim() == 4:  # one sample: 3D (1, D, H, W) or 2D (S, 3, H, W)
            x = x.unsqueeze(0)
        x = x.to(self.device, torch.float32)
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
        return torch.sigmoid(logits.float()).cpu().numpy()

    def predict_volume(self, volume: Any) -> Prediction:
        """Predict from an already-read `SeriesVolume`."""
        x = self.recipe(volume)
        probs = self.predict_tensor(x)[0]
        assessed = set(self.assessed)
        keys = [k for k in self.catalog.keys if k in assessed]
        probabilities = {k: float(p) for k, p in zip(self.catalog.keys, probs) if k in assessed}
        decisions = {k: bool(probabilities[k] >= self.thresholds.get(k, 0.5)) for k in keys}
        return Prediction(
            probabilities=probabilities,
            decisions=decisions,
            checkpoint_hash=self.checkpoint_hash,
            model_name=self.model_name,
            model_version=self.model_version,
            is_demo=self.is_demo,
            used_sop_instance_uids=list(getattr(volume, "sop_instance_uids", []) or []),
            thresholds={k: self.thresholds.get(k, 0.5) for k in keys},
            warnings=list(getattr(volume, "warnings", []) or []),
            not_assessed=[k for k in self.catalog.keys if k not in assessed],
        )

    def explain(
        self, volume: Any, keys: Sequence[str], *, key_images: int = 3, method: str = "gradient"
    ) -> dict[str, Any]:
        """Saliency of findings `keys` on `volume`, mapped to its slices (`molre.saliency`):
        plain data for the node's evidence images."""
        from molre.saliency import explain

        index = {k: i for i, k in enumerate(self.catalog.keys)}
        return explain(
            self.model,
            self.recipe,
            volume,
            {k: index[k] for k in keys},
            key_images=key_images,
            method=method,
            device=self.device,
        )

    def predict_series(self, files: str | Path | Sequence[str | Path]) -> Prediction:
        """Read a series (directory or list of DICOM files / a NIfTI file) and predict.

        Raises `SeriesError` (from the reader) when the series cannot be used, so the node can
        audit the reason instead of crashing.
        """
        from molre.data.volume import read_series, read_volume

        if isinstance(files, (str, Path)):
            volume = read_volume(Path(files))
        else:
            source = [Path(f) for f in files]
            if not source:
                raise MolreError("predict_series: no files given")
            volume = read_series(source)
        return self.predict_volume(volume)
