"""`molre-node train`: adapters (MoLRE / LoRA / none = linear probe) on a frozen backbone.

Pipeline: manifest → per-recipe tensor cache (`molre.cache`) → DataLoader → backbone + adapters +
head → multi-label focal loss (γ = 2, prevalence class weights, NaN labels masked) → AdamW with
linear warm-up + cosine → per-epoch validation (macro AUC) → checkpoints:

- ``out/last/`` every epoch: a loadable checkpoint + ``trainer_state.pt`` (optimizer, scheduler,
  RNG states, step) so ``--resume out`` continues exactly where it stopped;
- ``out/best/`` the epoch with the best validation macro AUC (what the node should load);
- ``out/metrics.jsonl`` one JSON line per epoch (losses, AUCs, LR, throughput, expert usage).

Determinism: every source of randomness is seeded from `seed` (model init, shuffling per epoch
from (seed, epoch), DataLoader worker seeds), and the RNG states are part of the resume state, so
an interrupted-and-resumed run reproduces an uninterrupted one.

Data parallel: under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) the model is wrapped in DDP
(gloo on CPU, nccl on CUDA), training data is split by a DistributedSampler, and only rank 0
builds the cache, validates, logs and writes files; the others wait at barriers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import ConfigError, MolreError
from common.fs import atomic_write
from common.jsonsafe import json_default
from common.log import get_logger
from common.validation import RuleError, config_error
from molre import __version__
from molre.losses import focal_loss, prevalence_weights
from molre.training import metrics as M
from molre.training.schedule import warmup_cosine

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "VAL_SPLITS",
    "TEST_SPLITS",
    "TRAIN_SPLITS",
    "predict_tensors",
    "choose_thresholds",
    "summarise_auc",
]

log = get_logger("molre.train")

TRAIN_SPLITS = {"train", "training"}
VAL_SPLITS = {"val", "valid", "validation", "tune", "dev"}
TEST_SPLITS = {"test", "testing", "holdout"}

TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
#: random-init backbones up to this many parameters get their base weights saved with the
#: checkpoint (so the digest check never depends on a torch version's RNG stream).
SAVE_BACKBONE_MAX_PARAMS = 20_000_000


#: a path given as str or Path (strict=False: pydantic turns the str into a Path)
_PathArg = Annotated[Path, Field(strict=False)]
#: a list of names, also given as a tuple
_Names = Annotated[list[str], Field(strict=False)]


class TrainConfig(BaseModel):
    """Everything `train` needs; the CLI maps its options 1:1 onto these fields.

    Validated on construction (unknown keys refused, no conversions but int -> float and str ->
    Path); a bad value raises `ConfigError` naming the field ("TrainConfig.epochs: expected an
    integer >= 1, got 0").
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        protected_namespaces=(),  # the field model_name
    )

    backbone: str
    data: _PathArg
    out: _PathArg
    weights: str | None = None
    adapter: Literal["molre", "lora", "none"] = "molre"
    """none = linear probe (only pooling and head train)"""
    experts: Annotated[int, Field(ge=1)] = 6
    rank: Annotated[int, Field(ge=1)] = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: _Names | None = None
    balance_weight: float = 0.0
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 4
    lr: Annotated[float, Field(gt=0)] = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    """fraction of optimizer steps"""
    accumulate: Annotated[int, Field(ge=1)] = 1
    workers: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    resume: _PathArg | None = None
    device: str = "auto"
    catalog: _PathArg | None = None
    cache_dir: _PathArg | None = None
    limit: int | None = Field(default=None, ge=1)
    """use only the first N manifest rows (debugging)"""
    gamma: float = 2.0
    max_pos_weight: float = 20.0
    grad_clip: float | None = 1.0
    val_fraction: float = 0.2
    progress: bool = True
    model_name: str | None = None
    is_demo: bool = False
    intended_use: str | None = None
    disclaimer: str | None = None
    catalog_keys: _Names | None = None
    """restrict the catalog to these findings (demo)"""
    calibrate_bn: bool | None = None
    """None = auto: only for small random-init backbones"""
    recipe: dict[str, Any] | None = None
    """overrides of the backbone's preprocessing params"""
    head_init: Literal["lp", "random"] = "lp"
    """lp = linear-probe warm start (LP-FT); random = no warm start"""
    stop_after_epoch: int | None = None
    """end this invocation after that epoch (time slicing)"""
    lp_l2: float = 10.0
    save_backbone: bool | None = None
    """ship the base weights as backbone.safetensors in every checkpoint; None = auto (only for
    small random-init backbones). True for a small backbone pretrained here (the demo), so the
    checkpoint stays self-contained and the digest check has the exact weights to load."""
    preset: str = "paper"
    """adapter placement when ``targets`` is not given: "paper" (default) or "light" (see
    docs/backbones.md for what each adapts and its parameter overhead)"""
    augment: Literal["none", "flip"] = "none"
    """training-time augmentation: "flip" mirrors each training volume left-right with
    probability 0.5 (drawn from the seed, the epoch and the batch, so a resumed run draws the
    same); for catalogs whose findings carry no side -- refused when a finding's key or name says
    left or right. Validation and inference never flip."""
    random_init: bool = False
    """allow training a backbone whose spec requires pretrained weights (ct-fm, dinov3-*,
    medsiglip) without ``weights``; off by default because the result is meaningless"""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), "TrainConfig.") from None

    @model_validator(mode="after")
    def _weights_or_random_init(self) -> TrainConfig:
        if self.random_init and self.weights is not None:
            raise RuleError(
                "random_init", "random_init (--random-init) and weights exclude each other"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict in field order (paths as text)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.model_dump().items()}

    def adapter_config(self, default_targets: Sequence[str] | None):
        """The MoLREConfig for this run (None for the linear probe)."""
        if self.adapter == "none":
            return None
        from molre.adapters import MoLREConfig

        targets = list(self.targets or default_targets or [])
        kw: dict[str, Any] = {}
        if targets:
            kw["targets"] = targets
        return MoLREConfig(
            experts=1 if self.adapter == "lora" else int(self.experts),
            rank=int(self.rank),
            alpha=float(self.alpha),
            dropout=float(self.dropout),
            balance_weight=float(self.balance_weight),
            **kw,
        )


@dataclass
class TrainResult:
    out: Path
    best_dir: Path | None
    last_dir: Path
    best_epoch: int | None
    best_val_macro_auc: float | None
    epochs_run: int
    global_step: int
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    enabled: bool
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _setup_dist(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(False, 0, 1, 0)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return _Dist(True, rank, world, local)


def _resolve_device(spec: str) -> torch.device:
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec}: CUDA is not available on this machine; use --device cpu"
        )
    return dev


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


class _CachedDataset(Dataset):
    def __init__(self, paths: Sequence[Path], labels: np.ndarray) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = torch.load(self.paths[i], map_location="cpu", weights_only=True)
        return x.float(), self.labels[i], i


class _EpochShuffle(Sampler[int]):
    """Permutation from (seed, epoch) alone — so a resumed run draws the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm_split(s: str | None) -> str:
    s = (s or "").strip().lower()
    if s in TRAIN_SPLITS:
        return "train"
    if s in VAL_SPLITS:
        return "val"
    if s in TEST_SPLITS:
        return "test"
    return s or "train"


def _assign_val(rows: list, fraction: float, seed: int) -> list[str]:
    """Splits per row; carve a validation set out of train by *patient* when none is given."""
    splits = [_norm_split(getattr(r, "split", None)) for r in rows]
    if "val" in splits:
        return splits
    patients = sorted(
        {
            str(getattr(r, "patient_id", "") or i)
            for i, r in enumerate(rows)
            if splits[i] == "train"
        },
        key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest(),
    )
    n_val = max(1, int(round(len(patients) * fraction))) if len(patients) > 1 else 0
    val_p = set(patients[:n_val])
    log.warning(
        "train.no_val_split",
        carved_patients=n_val,
        fraction=fraction,
        hint="add split=val rows to the manifest to choose the validation set yourself",
    )
    return [
        "val" if s == "train" and str(getattr(r, "patient_id", "") or i) in val_p else s
        for i, (r, s) in enumerate(zip(rows, splits))
    ]


# ----------------------------------------------------------------------------------------------
# model pieces
# ----------------------------------------------------------------------------------------------


def _collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, y, index, slice mask): 2D series of different lengths are padded (``pad_slices``)."""
    from molre.model import pad_slices

    xs, ys, idx = zip(*batch)
    x, mask = pad_slices(list(xs))
    return x, torch.stack(list(ys)), torch.as_tensor(idx), mask


def _loader(dataset: Dataset, batch_size: int, workers: int = 0, **kw: Any) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, **kw
    )


def _train_mode(model: nn.Module) -> None:
    """Train adapters/head while the frozen backbone keeps eval behaviour (norm statistics)."""
    from molre.adapters import adapted_layers

    model.train()
    bb = getattr(model, "backbone", None)
    if isinstance(bb, nn.Module):
        bb.eval()
        for layer in adapted_layers(model).values():
            layer.train()
            layer.base_layer.eval()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build_recipe(backbone: nn.Module, overrides: dict[str, Any] | None = None):
    """The backbone's preprocessing recipe, with `overrides` (e.g. a brain HU window for a
    random-init demo backbone) applied; the result is recorded in the model card, so the node
    preprocesses exactly like training did."""
    from molre.data.preprocess import Recipe

    rec = backbone.spec.recipe
    d = rec.to_dict() if hasattr(rec, "to_dict") else dict(rec)
    if overrides:
        d.update({k: v for k, v in overrides.items() if k != "name"})
    return Recipe.from_dict(d)


@torch.no_grad()
def calibrate_batchnorm(
    backbone: nn.Module, dataset: Dataset, batch_size: int, device: torch.device
) -> int:
    """Estimate BatchNorm running statistics of a *random-init* backbone on training volumes.

    Why: a freshly initialised network has running mean 0 / variance 1, so in eval mode its
    BatchNorm layers are identities while the signal shrinks layer after layer (PyTorch's default
    init), leaving features whose differences between volumes are ~1e-4 of their size — nothing
    that a head or adapter can learn from in a few epochs. One pass in train mode with a
    cumulative average (momentum=None) gives each block standardised inputs. The calibrated
    statistics are part of the base weights (saved with the checkpoint, covered by the digest).
    Returns the number of BatchNorm layers calibrated.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.to(device).train()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, _, _ in loader:
        backbone(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    backbone.eval()
    return len(bns)


@torch.no_grad()
def _features(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device
) -> np.ndarray:
    model.eval()
    feats = []
    for x, _, _, mask in _loader(dataset, batch_size, shuffle=False):
        x = x.to(device)
        mask = None if mask is None else mask.to(device)
        with _autocast(device):
            f = model.features(x, mask) if hasattr(model, "features") else model.backbone(x)
        feats.append(f.float().cpu().numpy())
    return np.concatenate(feats, 0).astype(np.float64)


def _ridge_logistic(
    Z: np.ndarray, y: np.ndarray, w_pos: float, l2: float, iters: int = 25
) -> tuple[np.ndarray, float]:
    """L2-regularised, class-weighted logistic regression by Newton's method (IRLS)."""
    n, d = Z.shape
    A = np.c_[Z, np.ones(n)]
    beta = np.zeros(d + 1)
    sw = np.where(y == 1, w_pos, 1.0)
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-6  # do not shrink the bias
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(A @ beta, -30, 30)))
        g = A.T @ (sw * (p - y)) + reg * beta
        H = (A * (sw * p * (1 - p))[:, None]).T @ A + np.diag(reg)
        step = np.linalg.solve(H, g)
        beta -= step
        if np.abs(step).max() < 1e-6:
            break
    return beta[:-1], float(beta[-1])


def linear_probe_init(
    model: nn.Module,
    dataset: Dataset,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device,
    pos_weight: torch.Tensor,
    l2: float = 1.0,
) -> int:
    """Warm-start the linear head with a closed-form linear probe (LP-FT, Kumar et al. 2022).

    Why: adapters start as the identity, so the only thing that can move the loss at first is
    the head, and frozen features are often badly scaled (a random-init backbone's features
    differ between volumes by ~1 % of their size). Fitting the head on standardised features
    first, then fine-tuning adapters + head, starts training from the best linear read-out
    instead of from noise, and keeps early adapter updates from being driven by a random head.
    Findings with no labelled positives or negatives keep their initial weights.
    Returns the number of findings initialised.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return 0
    Fx = _features(model, dataset, batch_size, device)
    mu = Fx.mean(0)
    sd = Fx.std(0) + 1e-8
    Z = (Fx - mu) / sd
    W = head.weight.detach().cpu().double().numpy().copy()
    b = head.bias.detach().cpu().double().numpy().copy()
    pw = pos_weight.detach().cpu().double().numpy()
    done = 0
    for f in range(labels.shape[1]):
        y = labels[:, f]
        m = ~np.isnan(y)
        if m.sum() < 2 or y[m].min() == y[m].max():
            continue
        w_std, b_std = _ridge_logistic(Z[m], y[m], float(pw[f]), l2)
        W[f] = w_std / sd
        b[f] = b_std - float((w_std * mu / sd).sum())
        done += 1
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return done


@torch.no_grad()
def predict_tensors(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    pos_weight: torch.Tensor | None = None,
    gamma: float = 2.0,
    workers: int = 0,
) -> tuple[np.ndarray, float | None]:
    """Probabilities (n, F) over a dataset of (x, y, i) and the mean focal loss (None if unlabelled)."""
    model.eval()
    loader = _loader(dataset, batch_size, workers, shuffle=False)
    probs: list[np.ndarray] = []
    tot, cnt = 0.0, 0
    for x, y, _, mask in loader:
        x = x.to(device, non_blocking=True)
        mask = None if mask is None else mask.to(device)
        with _autocast(device):
            logits = model(x) if mask is None else model(x, mask)
        logits = logits.float()
        probs.append(torch.sigmoid(logits).cpu().numpy())
        y = y.to(device)
        m = (~torch.isnan(y)).sum().item()
        if m:
            tot += float(focal_loss(logits, y, gamma=gamma, pos_weight=pos_weight, reduction="sum"))
            cnt += m
    out = np.concatenate(probs, 0) if probs else np.zeros((0, 0), np.float32)
    return out, (tot / cnt if cnt else None)


#: Below this validation AUC a finding's scores barely rank cases, and Youden's J picks an
#: arbitrary point of a noisy ROC curve (often a tiny probability that calls most cases
#: positive). Such findings get a conservative threshold instead (see `choose_thresholds`).
MIN_INFORMATIVE_AUC = 0.6


def choose_thresholds(
    labels: np.ndarray, probs: np.ndarray, keys: Sequence[str]
) -> dict[str, dict]:
    """Per-finding decision threshold by Youden's J on the given (validation) cases.

    Fallbacks, each with a note in the model card: no positives or negatives → 0.5; validation
    AUC below :data:`MIN_INFORMATIVE_AUC` → the larger of 0.5 and the highest score of a
    validation negative, so an uninformative output is (almost) never reported as "present".
    """
    out: dict[str, dict] = {}
    for f, k in enumerate(keys):
        y = labels[:, f]
        m = ~np.isnan(y)
        npos = int((y[m] == 1).sum())
        nneg = int((y[m] == 0).sum())
        t = M.youden_threshold(y, probs[:, f]) if npos and nneg else None
        auc = M.auc(y[m], probs[m, f]) if npos and nneg else None
        if t is None or not math.isfinite(t):
            out[k] = {
                "value": 0.5,
                "method": "default",
                "note": f"no threshold could be chosen on validation (positives={npos}, "
                f"negatives={nneg}); 0.5 used",
            }
        elif auc is None or auc < MIN_INFORMATIVE_AUC:
            top_neg = float(np.max(probs[m, f][y[m] == 0]))
            value = float(np.nextafter(max(0.5, top_neg), np.inf))
            out[k] = {
                "value": value,
                "method": "uninformative",
                "note": f"validation AUC {auc:.2f} < {MIN_INFORMATIVE_AUC}: the score does "
                "not rank cases, so the threshold is above every validation "
                "negative (and at least 0.5)",
                "validation_auc": float(auc),
                "validation_positives": npos,
                "validation_negatives": nneg,
            }
        else:
            out[k] = {
                "value": float(t),
                "method": "youden_j",
                "note": None,
                "validation_auc": float(auc),
                "validation_positives": npos,
                "validation_negatives": nneg,
            }
    return out


def summarise_auc(labels: np.ndarray, probs: np.ndarray, catalog: Any) -> dict[str, Any]:
    """Per-finding AUC, macro AUC and per-category macro AUC (None = n/a)."""
    per = M.auc_matrix(labels, probs) if len(labels) else [None] * len(catalog.keys)
    per_key = dict(zip(catalog.keys, per))
    by_cat: dict[str, float | None] = {}
    for f in catalog:
        by_cat.setdefault(f.category, None)
    for cat in by_cat:
        by_cat[cat] = M.macro([per_key[f.key] for f in catalog if f.category == cat])
    return {
        "macro_auc": M.macro(per),
        "auc": per_key,
        "auc_by_category": by_cat,
        "n_findings_with_auc": sum(v is not None for v in per),
    }


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def _catalog_for(cfg: TrainConfig):
    """(catalog the manifest is read with, catalog the model predicts)."""
    from molre.catalog import Catalog, load_catalog

    full = load_catalog(cfg.catalog)
    if not cfg.catalog_keys:
        return full, full
    sub = Catalog(
        [full.get(k) for k in cfg.catalog_keys],
        name=f"{full.name}-subset",
        version=full.version,
        source=f"{full.source} (subset)",
    )
    return full, sub


def _json_line(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: Path, upto_epoch: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("epoch", 0)) <= upto_epoch:
                keep.append(line)
        except (ValueError, json.JSONDecodeError):
            continue
    path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


_RESUME_KEYS = (
    "backbone",
    "weights",
    "adapter",
    "experts",
    "rank",
    "alpha",
    "dropout",
    "targets",
    "balance_weight",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "accumulate",
    "seed",
    "gamma",
    "catalog",
    "catalog_keys",
    "limit",
    "data",
    "recipe",
    "head_init",
    "lp_l2",
    "calibrate_bn",
    "max_pos_weight",
    "grad_clip",
    "val_fraction",
    "preset",
)


@dataclass
class _Run:
    """What `_setup` builds: everything one epoch, validation and checkpointing read."""

    cfg: TrainConfig
    device: torch.device
    dd: _Dist
    out: Path
    catalog: Any
    model: nn.Module
    net: nn.Module  # `model`, or its DDP wrapper
    acfg: Any  # MoLREConfig | None (linear probe)
    opt: torch.optim.Optimizer
    sched: Any
    params: list[nn.Parameter]
    sampler: Any
    loader: DataLoader
    loader_gen: torch.Generator
    ds_tr: Dataset
    ds_va: Dataset
    ytr: np.ndarray
    yva: np.ndarray
    pos_weight: torch.Tensor
    batches_per_epoch: int
    steps_per_epoch: int
    backbone_state: dict[str, torch.Tensor] | None
    card_base: dict[str, Any]  # model-card fields fixed for the whole run
    flip_dim: int | None = None  # batch dimension that runs left-right ("flip" augmentation)

    @property
    def last_dir(self) -> Path:
        return self.out / "last"

    @property
    def best_dir(self) -> Path:
        return self.out / "best"

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_FILE


@dataclass
class _Progress:
    """What changes from epoch to epoch (and is saved in trainer_state.pt for --resume)."""

    epoch: int = 0
    global_step: int = 0
    best_auc: float | None = None
    best_loss: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring.

    Reads like timm's train script: set-up (`_setup`), resume or fresh start (`_resume` /
    `_fresh_start`), then per epoch `_train_one_epoch`, `_validate` and `_save_epoch`.
    """
    run, state = _setup(cfg)
    progress = _resume(run, state) if state is not None else _fresh_start(run)
    if run.dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.net = DDP(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if run.dd.main:
        log.info(
            "train.start",
            backbone=cfg.backbone,
            adapter=cfg.adapter,
            preset=cfg.preset,
            train=len(run.ds_tr),
            val=len(run.ds_va),
            failed=run.card_base["training"]["counts"]["failed"],
            trainable_params=run.card_base["adapter"]["trainable_params"],
            device=str(run.device),
            world_size=run.dd.world,
            epochs=cfg.epochs,
            steps_per_epoch=run.steps_per_epoch,
        )
    start_epoch = progress.epoch
    end_epoch = (
        cfg.epochs if cfg.stop_after_epoch is None else min(cfg.epochs, int(cfg.stop_after_epoch))
    )
    for epoch in range(start_epoch, end_epoch):
        train_loss, epoch_s = _train_one_epoch(run, progress, epoch)
        if run.dd.main:
            val, thresholds, usage = _validate(run)
            _save_epoch(run, progress, epoch, train_loss, epoch_s, val, thresholds, usage)
        run.dd.barrier()

    result = TrainResult(
        out=run.out,
        best_dir=run.best_dir if (run.best_dir / "model.json").exists() else None,
        last_dir=run.last_dir,
        best_epoch=progress.best_epoch,
        best_val_macro_auc=progress.best_auc,
        epochs_run=max(0, end_epoch - start_epoch),
        global_step=progress.global_step,
        history=progress.history,
    )
    run.dd.barrier()
    return result


# -- set-up ---------------------------------------------------------------------------------------


def _check_backbone_weights(cfg: TrainConfig) -> None:
    """Checks that need no data: the adapter preset exists; a foundation-model backbone at random
    init trains nothing useful, so refuse it unless asked for with ``random_init`` (then say so
    loudly)."""
    from molre.backbones import get_spec, preset_targets

    spec = get_spec(cfg.backbone)
    if cfg.adapter != "none" and not cfg.targets:
        preset_targets(spec, cfg.preset)  # an unknown preset fails before any data is read
    if cfg.weights is not None or not spec.requires_weights:
        return
    if not cfg.random_init:
        raise ConfigError(
            f"backbone {cfg.backbone!r} is a pretrained foundation model and no --weights were "
            f"given: training it from random init produces a meaningless model. Pass --weights "
            f"(file, folder or hf://repo in an offline cache), or --random-init if you really want "
            f"an untrained backbone (pipeline tests only). {spec.weights_hint}"
        )
    log.warning(
        "train.random_init_backbone",
        backbone=cfg.backbone,
        warning=f"{cfg.backbone} is trained from RANDOM INIT (--random-init): the model "
        "is not a foundation model and its results mean nothing clinically",
    )


def _weights_ref(weights: str | None) -> str:
    """How the card records the backbone weights: ``hf://`` references as given, local paths
    absolute (so a node on the same machine finds them from any working directory)."""
    if not weights:
        return "random-init"
    if str(weights).startswith("hf://"):
        return str(weights)
    return str(Path(weights).expanduser().resolve())


def _load_resume_state(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    """trainer_state.pt of the run to resume (None for a fresh run); the options that shape the
    run must be those it was started with."""
    if cfg.resume is None:
        return None
    sp = out / "last" / TRAINER_STATE
    if not sp.is_file():
        raise MolreError(
            f"--resume {out}: {sp} not found; resume needs a run directory "
            "written by `molre-node train` (with last/trainer_state.pt)"
        )
    state = torch.load(sp, map_location="cpu", weights_only=False)
    saved = state.get("config", {})
    now = cfg.to_dict()
    diff = [k for k in _RESUME_KEYS if k in saved and str(saved.get(k)) != str(now.get(k))]
    if diff:
        raise MolreError(
            f"--resume {out}: options differ from the original run: "
            + ", ".join(f"{k} (was {saved.get(k)!r}, now {now.get(k)!r})" for k in diff)
            + "; resume with the same options (only --epochs/--workers/--device may change)"
        )
    return state


def _setup(cfg: TrainConfig) -> tuple[_Run, dict[str, Any] | None]:
    """Device, processes, data (through the tensor cache), backbone, model, optimizer, schedule,
    loader and the static part of the model card. Random-number use is in a fixed order, so a
    resumed run rebuilds exactly the same model."""
    from molre.backbones import create_backbone, weights_digest
    from molre.cache import VolumeCache
    from molre.data.manifest import read_manifest
    from molre.model import build_model, set_trainable

    _check_backbone_weights(cfg)
    device = _resolve_device(cfg.device)
    dd = _setup_dist(device)
    if device.type == "cuda" and dd.enabled:
        device = torch.device("cuda", dd.local_rank)
        torch.cuda.set_device(device)
    out = Path(cfg.resume or cfg.out)
    state = _load_resume_state(cfg, out)

    _seed_all(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    read_catalog, catalog = _catalog_for(cfg)
    rows = read_manifest(cfg.data, read_catalog)
    label_cols = [read_catalog.index(k) for k in catalog.keys]
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise MolreError(f"{cfg.data}: the manifest has no rows")
    splits = _assign_val(rows, cfg.val_fraction, cfg.seed)

    # Backbone (random init seeded so every rank and a resumed run get the same weights).
    torch.manual_seed(cfg.seed)
    backbone = (
        create_backbone(cfg.backbone, weights=cfg.weights)
        if cfg.weights
        else create_backbone(cfg.backbone)
    )
    base_digest = weights_digest(backbone)
    n_base = sum(p.numel() for p in backbone.parameters())
    want_bb = cfg.save_backbone if cfg.save_backbone is not None else cfg.weights is None
    save_bb = bool(want_bb) and n_base <= SAVE_BACKBONE_MAX_PARAMS
    backbone_state = (
        {k: v.detach().clone() for k, v in backbone.state_dict().items()} if save_bb else None
    )
    recipe = _build_recipe(backbone, cfg.recipe)
    spec = backbone.spec
    flip_dim = _flip_dim(cfg, recipe, spec.dims, catalog)

    # Cache: rank 0 preprocesses, the others wait and then just look the files up.
    cache = VolumeCache(cfg.cache_dir or (out / "cache"), recipe)
    use_idx = [i for i, s in enumerate(splits) if s in ("train", "val")]
    sources = [str(rows[i].path) for i in use_idx]
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        report = cache.build(sources, workers=cfg.workers, progress=cfg.progress)
    dd.barrier()
    if not dd.main:
        report = cache.build(sources, workers=0, progress=False)
    ok = [i for i in use_idx if str(rows[i].path) in report.paths]
    tr = [i for i in ok if splits[i] == "train"]
    va = [i for i in ok if splits[i] == "val"]
    if not tr:
        raise MolreError(
            f"{cfg.data}: no usable training series (split=train); "
            f"{len(report.failures)} series failed to preprocess"
        )
    if not va:
        raise MolreError(f"{cfg.data}: no usable validation series; add split=val rows")
    labels = np.stack([np.asarray(r.labels, dtype=np.float32)[label_cols] for r in rows])
    ytr, yva = labels[tr], labels[va]
    ds_tr = _CachedDataset([report.paths[str(rows[i].path)] for i in tr], ytr)
    ds_va = _CachedDataset([report.paths[str(rows[i].path)] for i in va], yva)

    calibrate = (
        cfg.calibrate_bn if cfg.calibrate_bn is not None else (save_bb and cfg.weights is None)
    )
    bn_layers = 0
    if calibrate:
        if cfg.weights is not None:
            raise ConfigError(
                "BatchNorm calibration is for random-init backbones only; "
                "pretrained weights (--weights) keep their statistics"
            )
        bn_layers = calibrate_batchnorm(backbone, ds_tr, cfg.batch_size, device)
        backbone.cpu()
        base_digest = weights_digest(backbone)
        backbone_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}

    from molre.backbones import preset_targets

    acfg = cfg.adapter_config(preset_targets(spec, cfg.preset))
    torch.manual_seed(cfg.seed + 1)
    model = build_model(backbone, catalog, acfg)
    n_trainable = set_trainable(model)
    n_total = sum(p.numel() for p in model.parameters())
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )

    if dd.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler: Any = DistributedSampler(
            ds_tr, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
    else:
        sampler = _EpochShuffle(len(ds_tr), cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
    total_steps = steps_per_epoch * cfg.epochs
    warm = max(1, int(round(cfg.warmup * total_steps))) if cfg.warmup > 0 else 0
    sched = warmup_cosine(opt, total_steps, warm)
    pos_weight = prevalence_weights(ytr, cfg.max_pos_weight).to(device)

    loader_gen = torch.Generator()
    loader = _loader(
        ds_tr,
        cfg.batch_size,
        cfg.workers,
        sampler=sampler,
        worker_init_fn=_worker_init,
        generator=loader_gen,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    labelled = ~np.isnan(ytr)
    positives = {k: int(np.nansum(ytr[:, f])) for f, k in enumerate(catalog.keys)}
    packaged = getattr(model.backbone, "weights_source", None)
    card_base: dict[str, Any] = {
        "model_name": cfg.model_name or f"molre-{cfg.backbone}-{cfg.adapter}",
        "is_demo": bool(cfg.is_demo),
        "backbone": {
            "name": cfg.backbone,
            "weights_digest": base_digest,
            # weights shipped with the package (phantom-3d) are named as such
            "weights_source": (
                str(packaged) if packaged and cfg.weights is None else _weights_ref(cfg.weights)
            ),
            "init_seed": cfg.seed if cfg.weights is None and not packaged else None,
            "base_params": int(n_base),
            "batchnorm_calibrated": (
                {"layers": bn_layers, "volumes": len(tr), "on": "training split"}
                if bn_layers
                else None
            ),
        },
        "adapter": {
            "type": cfg.adapter,
            "config": acfg.to_dict() if acfg else None,
            "preset": None if (acfg is None or cfg.targets) else cfg.preset,
            "trainable_params": int(n_trainable),
            "total_params": int(n_total),
        },
        "catalog": catalog.to_dict(),
        "catalog_digest": catalog.digest(),
        "recipe": recipe.to_dict(),
        "training": {
            "manifest": str(cfg.data),
            "manifest_sha256": _file_sha256(cfg.data),
            "counts": {
                "train": len(tr),
                "val": len(va),
                "test": sum(1 for s in splits if s == "test"),
                "failed": len(report.failures),
            },
            "prevalence_train": {
                k: (
                    float(np.nansum(ytr[:, f]) / labelled[:, f].sum())
                    if labelled[:, f].sum()
                    else None
                )
                for f, k in enumerate(catalog.keys)
            },
            "positives_train": positives,
            "findings_without_train_positives": [k for k, v in positives.items() if v == 0],
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "accumulate": cfg.accumulate,
            "world_size": dd.world,
            "head_init": cfg.head_init,
            "augment": cfg.augment,
            "loss": {
                "type": "focal",
                "gamma": cfg.gamma,
                "pos_weight": "n_neg/n_pos clipped",
                "max_pos_weight": cfg.max_pos_weight,
            },
            "optimizer": {
                "type": "AdamW",
                "weight_decay": cfg.weight_decay,
                "schedule": "linear warm-up + cosine",
                "warmup_steps": warm,
                "total_steps": total_steps,
            },
        },
    }
    run = _Run(
        cfg=cfg,
        device=device,
        dd=dd,
        out=out,
        catalog=catalog,
        model=model,
        net=model,
        acfg=acfg,
        opt=opt,
        sched=sched,
        params=params,
        sampler=sampler,
        loader=loader,
        loader_gen=loader_gen,
        ds_tr=ds_tr,
        ds_va=ds_va,
        ytr=ytr,
        yva=yva,
        pos_weight=pos_weight,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        backbone_state=backbone_state,
        card_base=card_base,
        flip_dim=flip_dim,
    )
    return run, state


_SIDE_WORDS = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)")


def _flip_dim(cfg: TrainConfig, recipe: Any, dims: int, catalog: Any) -> int | None:
    """The batch dimension that runs left-right, for ``augment="flip"`` (else None).

    3D batches are (B, C, ax0, ax1, ax2), 2D batches (B, S=ax0, C, ax1, ax2), where axN is the
    N-th letter of the recipe's orientation (default "SPL": the last axis is left-right)."""
    if cfg.augment != "flip":
        return None
    sided = [
        k
        for k in catalog.keys
        if _SIDE_WORDS.search(f"{k} {catalog[k].name}".lower().replace("_", " "))
    ]
    if sided:
        raise ConfigError(
            f"TrainConfig.augment='flip' mirrors left and right, but these findings name a side: "
            f"{', '.join(sided[:5])}; train without --augment flip"
        )
    orient = str(recipe.params.get("orientation", "SPL")).upper()
    axis = next((i for i, c in enumerate(orient) if c in "LR"), None)
    if axis is None:
        raise ConfigError(f"recipe orientation {orient!r} has no left-right axis to flip")
    return 2 + axis if dims == 3 else (1, 3, 4)[axis]


def _flip_some(x: torch.Tensor, dim: int, seed: int, epoch: int, batch: int) -> torch.Tensor:
    """Mirror each volume of the batch along `dim` with probability 0.5, drawn from (seed,
    epoch, batch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + batch)
    pick = torch.rand(x.shape[0], generator=g) < 0.5
    if not bool(pick.any()):
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return torch.where(pick.view(shape).to(x.device), x.flip(dim), x)


# -- resume / fresh start ------------------------------------------------------------------------


def _resume(run: _Run, state: dict[str, Any]) -> _Progress:
    """Adapter/head tensors of last/, optimizer, schedule, RNG states and the run's history."""
    from molre.checkpoint import ADAPTER_FILE, _load_tensors
    from molre.model import trainable_state_dict

    cfg = run.cfg
    tensors = _load_tensors(run.last_dir / ADAPTER_FILE)
    if set(tensors) != set(trainable_state_dict(run.model)):
        raise MolreError(
            f"--resume {run.out}: {run.last_dir / ADAPTER_FILE} does not match the model"
        )
    run.model.load_state_dict({k: v.to(run.device) for k, v in tensors.items()}, strict=False)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    progress = _Progress(
        epoch=int(state["epoch"]),
        global_step=int(state["global_step"]),
        best_auc=state.get("best_auc"),
        best_loss=state.get("best_loss"),
        best_epoch=state.get("best_epoch"),
        history=list(state.get("history", [])),
    )
    _set_rng_state(state["rng"])
    if run.dd.main:
        _truncate_metrics(run.metrics_path, progress.epoch)
    log.info("train.resumed", out=str(run.out), epoch=progress.epoch, step=progress.global_step)
    if int(state.get("config", {}).get("epochs", cfg.epochs)) != cfg.epochs:
        log.warning(
            "train.resume_epochs_changed",
            was=state["config"]["epochs"],
            now=cfg.epochs,
            hint="the cosine schedule spans --epochs, so this is not an exact continuation",
        )
    return progress


def _fresh_start(run: _Run) -> _Progress:
    """A new run: clear old metrics; warm-start the head with a linear probe (LP-FT)."""
    cfg = run.cfg
    if run.dd.main and run.metrics_path.exists():
        run.metrics_path.unlink()
    if cfg.head_init == "lp":
        # every rank computes the same probe from the same data: no broadcast needed
        n_lp = linear_probe_init(
            run.model, run.ds_tr, run.ytr, cfg.batch_size, run.device, run.pos_weight, cfg.lp_l2
        )
        if run.dd.main:
            log.info("train.linear_probe_init", findings=n_lp)
    return _Progress()


# -- one epoch -----------------------------------------------------------------------------------


def _train_one_epoch(run: _Run, progress: _Progress, epoch: int) -> tuple[float, float]:
    """One pass over the training split (gradient accumulation, clipping, LR schedule per
    optimizer step). Returns (mean training loss over all processes, seconds)."""
    from tqdm.auto import tqdm

    cfg, dd, device = run.cfg, run.dd, run.device
    run.sampler.set_epoch(epoch)
    run.loader_gen.manual_seed(cfg.seed * 7919 + epoch)
    _train_mode(run.model)
    balance = run.acfg is not None and run.acfg.balance_weight > 0
    t0 = time.perf_counter()
    seen, loss_sum, loss_n = 0, 0.0, 0
    n_batches = run.batches_per_epoch
    bar = tqdm(
        total=n_batches,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not (cfg.progress and dd.main),
        leave=False,
        unit="batch",
    )
    run.opt.zero_grad(set_to_none=True)
    for b, (x, y, _, mask) in enumerate(run.loader):
        x = x.to(device, non_blocking=True)
        if run.flip_dim is not None:
            x = _flip_some(x, run.flip_dim, cfg.seed, epoch, b)
        y = y.to(device, non_blocking=True)
        mask = None if mask is None else mask.to(device)
        last_micro = (b + 1) % cfg.accumulate == 0 or (b + 1) == n_batches
        sync = run.net.no_sync() if (dd.enabled and not last_micro) else contextlib.nullcontext()
        with sync:
            with _autocast(device):
                logits = run.net(x) if mask is None else run.net(x, mask)
            loss = focal_loss(logits, y, gamma=cfg.gamma, pos_weight=run.pos_weight)
            if balance:
                from molre.adapters import balance_loss

                loss = loss + balance_loss(run.model)
            group_start = (b // cfg.accumulate) * cfg.accumulate
            group = min(cfg.accumulate, n_batches - group_start)
            (loss / group).backward()
        if last_micro:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
            run.opt.step()
            run.sched.step()
            run.opt.zero_grad(set_to_none=True)
            progress.global_step += 1
        loss_sum += float(loss.detach()) * x.shape[0]
        loss_n += x.shape[0]
        seen += x.shape[0]
        el = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_sum / max(loss_n, 1):.4f}", vol_s=f"{seen * dd.world / max(el, 1e-9):.1f}"
        )
    bar.close()
    epoch_s = time.perf_counter() - t0
    train_loss = loss_sum / max(loss_n, 1)
    if dd.enabled:
        t = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64)
        dist.all_reduce(t)
        train_loss = float(t[0] / max(t[1], 1.0))
    return train_loss, epoch_s


# -- validation ----------------------------------------------------------------------------------


def _validate(run: _Run) -> tuple[dict[str, Any], dict[str, dict], dict[str, dict]]:
    """Scores on the validation split: AUCs (``summarise_auc`` + ``loss``), Youden thresholds,
    and the routers' expert usage on those cases."""
    from molre.adapters import adapted_layers, expert_usage, reset_expert_usage

    has_adapters = bool(adapted_layers(run.model))
    if has_adapters:
        reset_expert_usage(run.model)
    probs, val_loss = predict_tensors(
        run.model, run.ds_va, run.cfg.batch_size, run.device, run.pos_weight, run.cfg.gamma
    )
    usage = (
        {
            k: {"mean_gate": v["mean_gate"], "entropy": v["entropy"]}
            for k, v in expert_usage(run.model).items()
        }
        if has_adapters
        else {}
    )
    val = summarise_auc(run.yva, probs, run.catalog)
    val["loss"] = val_loss
    return val, choose_thresholds(run.yva, probs, run.catalog.keys), usage


# -- checkpointing -------------------------------------------------------------------------------


def _make_card(run: _Run, progress: _Progress, epoch: int, val: dict, thresholds: dict) -> dict:
    """The model card of the checkpoint written after `epoch` (1-based)."""
    cfg = run.cfg
    base = json.loads(json.dumps(run.card_base, default=json_default))
    training: dict[str, Any] = {}
    for k, v in base["training"].items():
        training[k] = v
        if k == "epochs":
            training.update(epoch=epoch, global_step=progress.global_step)
    card: dict[str, Any] = {
        "model_name": base["model_name"],
        "model_version": f"{__version__}+e{epoch}",
    }
    card.update({k: v for k, v in base.items() if k not in ("model_name", "training")})
    card.update(
        thresholds=thresholds, training=training, metrics={"split": "val", "epoch": epoch, **val}
    )
    if cfg.intended_use:
        card["intended_use"] = cfg.intended_use
    if cfg.is_demo:
        from molre.checkpoint import DEMO_DISCLAIMER

        card["disclaimer"] = cfg.disclaimer or DEMO_DISCLAIMER
        card["training_data"] = "synthetic training data — not for clinical use"
    elif cfg.disclaimer:
        card["disclaimer"] = cfg.disclaimer
    return card


def _save_epoch(
    run: _Run,
    progress: _Progress,
    epoch: int,
    train_loss: float,
    epoch_s: float,
    val: dict,
    thresholds: dict,
    usage: dict,
) -> None:
    """last/ every epoch, best/ when validation improved, trainer_state.pt (for --resume) and one
    metrics.jsonl line. Rank 0 only."""
    from molre.checkpoint import save_checkpoint

    macro, val_loss = val["macro_auc"], val["loss"]
    improved = (macro is not None and (progress.best_auc is None or macro > progress.best_auc)) or (
        macro is None
        and progress.best_auc is None
        and val_loss is not None
        and (progress.best_loss is None or val_loss < progress.best_loss)
    )
    rec = {
        "epoch": epoch + 1,
        "step": progress.global_step,
        "lr": float(run.sched.get_last_lr()[0]),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_macro_auc": macro,
        "val_auc": val["auc"],
        "val_auc_by_category": val["auc_by_category"],
        "epoch_seconds": round(epoch_s, 3),
        "volumes_per_s": round(len(run.ds_tr) / max(epoch_s, 1e-9), 3),
        "expert_usage": usage,
        "best": bool(improved),
    }
    progress.history.append(rec)
    card = _make_card(run, progress, epoch + 1, val, thresholds)
    save_checkpoint(run.last_dir, run.model, card, backbone_state=run.backbone_state)
    if improved:
        progress.best_auc = macro if macro is not None else progress.best_auc
        progress.best_loss = val_loss
        progress.best_epoch = epoch + 1
        save_checkpoint(run.best_dir, run.model, card, backbone_state=run.backbone_state)
    progress.epoch = epoch + 1
    tstate = {
        "epoch": epoch + 1,
        "global_step": progress.global_step,
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "rng": _rng_state(),
        "best_auc": progress.best_auc,
        "best_loss": progress.best_loss,
        "best_epoch": progress.best_epoch,
        "config": run.cfg.to_dict(),
        "history": progress.history,
    }
    atomic_write(run.last_dir / TRAINER_STATE, lambda fh: torch.save(tstate, fh), binary=True)
    _json_line(run.metrics_path, rec)
    log.info(
        "train.epoch",
        epoch=epoch + 1,
        step=progress.global_step,
        train_loss=round(train_loss, 5),
        val_loss=None if val_loss is None else round(val_loss, 5),
        val_macro_auc=None if macro is None else round(macro, 4),
        volumes_per_s=rec["volumes_per_s"],
        best=improved,
    )
