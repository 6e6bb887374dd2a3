"""Pretrain the phantom-3d backbone with dense supervision: the stand-in for foundation pretraining.

``python -m molre.training.pretrain --out molre/resources/phantom-3d`` regenerates the shipped
weights bit for bit (same seed, same torch build, same thread count; CPU).

Why dense supervision: a classifier trained end to end on a few thousand phantoms stays at chance
(the findings are small and the label says only "somewhere"); masks of every planted finding say
*where*, which is what makes a compact network learn features that localise abnormalities, the
property a CT foundation model brings to its adapters. The loss is voxel-wise BCE + soft Dice on
the mask logits at half resolution, plus a per-finding presence BCE on (max of the mask logit,
pooled features). Phantoms are generated on the fly from every built-in site (or the ones named),
through the same preprocessing recipe the node uses, each from its own seed, so the data do not
depend on the number of generator processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.log import get_logger

log = get_logger("molre.pretrain")

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


@dataclass
class PretrainConfig:
    """Everything that determines the weights (recorded in the card)."""

    seed: int = 0
    train_phantoms: int = 1400
    val_phantoms: int = 240
    epochs: int = 6
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    prevalence: float = 0.25
    normal_fraction: float = 0.15
    sites: tuple[str, ...] = ()  # empty = every built-in site
    pos_weight: float = 5.0
    dice_weight: float = 1.0
    presence_weight: float = 0.5
    threads: int = 2
    workers: int = 2  # generator processes (the data do not depend on it)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = list(self.sites)
        return d


@dataclass
class Sample:
    x: np.ndarray  # (C, D, H, W) float16, the recipe's output
    mask: np.ndarray  # (K, D/2, H/2, W/2) uint8, per-finding masks at the mask-logit grid
    presence: np.ndarray  # (K,) float32
    site: str


def _sample_job(job: tuple) -> Sample:
    """Render one phantom (seeded by (seed, split, index)) and prepare input and targets.

    `job` = (seed, split, index, prevalence, normal_fraction, sites[, with_masks=True]); without
    masks (benchmarks that need only the input and labels) the mask array is empty."""
    from molre.backbones.phantom import PHANTOM_RECIPE
    from molre.data.preprocess import Recipe
    from molre.data.synth import (
        PHANTOM_FINDINGS,
        _prevalences,
        check_sites,
        render,
        sample_findings,
    )

    seed, split, i, prevalence, normal_fraction, sites = job[:6]
    with_masks = bool(job[6]) if len(job) > 6 else True
    rng = np.random.default_rng([seed, split, i])
    names = check_sites(sites)
    site = names[int(rng.integers(len(names)))]
    found = sample_findings(rng, _prevalences(prevalence, PHANTOM_FINDINGS), normal_fraction)
    r = render(rng, found, size=None, site=site)
    recipe = Recipe.from_dict(PHANTOM_RECIPE)
    img = recipe.transform_meta(r.volume())
    x = np.asarray(img.as_tensor(), dtype=np.float16)
    masks = np.zeros((len(PHANTOM_FINDINGS), *[s // 2 for s in x.shape[1:]]), dtype=np.uint8)
    if not with_masks:
        masks = masks[:0]
    elif r.masks:
        idx = _native_index_of_output(img, r.geometry, x.shape[1:])
        for k, m in r.masks.items():
            masks[PHANTOM_FINDINGS.index(k)] = _mask_on_grid(m, idx, x.shape[1:])
    presence = np.array([float(k in found) for k in PHANTOM_FINDINGS], dtype=np.float32)
    return Sample(x=x, mask=masks, presence=presence, site=site)


def _native_index_of_output(img: Any, geom: Any, shape: Sequence[int]) -> np.ndarray:
    """(3, N) fractional (z, y, x) indices in the phantom's own grid of every output voxel."""
    aff = np.asarray(img.affine, dtype=np.float64)  # output voxel -> RAS mm
    grid = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=0
    ).reshape(3, -1)
    ras = aff[:3, :3] @ grid + aff[:3, 3:4]
    lps = ras * np.array([[-1.0], [-1.0], [1.0]])
    return geom.world_to_index(lps.T).T


def _mask_on_grid(mask: np.ndarray, idx: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A finding's mask on the mask-logit grid (half the recipe's output): the output voxel's
    covered fraction (linear interpolation), max-pooled 2x2x2, thresholded at 0.25, with the
    single best voxel always kept so that a finding smaller than a voxel still has a target."""
    from scipy import ndimage

    frac = ndimage.map_coordinates(
        mask.astype(np.float32), idx, order=1, mode="constant", cval=0.0
    ).reshape(shape)
    t = torch.from_numpy(frac)[None, None]
    pooled = F.max_pool3d(t, 2)[0, 0].numpy()
    out = pooled >= 0.25
    if pooled.max() > 0:
        out.flat[int(pooled.argmax())] = True
    return out.astype(np.uint8)


def generate(cfg: PretrainConfig, split: int, count: int, progress: bool = False) -> list[Sample]:
    """`count` samples of split 0 (train) / 1 (validation), in index order."""
    jobs = [
        (cfg.seed, split, i, cfg.prevalence, cfg.normal_fraction, tuple(cfg.sites))
        for i in range(count)
    ]
    out: list[Sample] = []
    t0 = time.perf_counter()
    if cfg.workers > 1:
        # spawn, not fork: a fork after torch has run its thread pool can deadlock the children
        with ProcessPoolExecutor(
            max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")
        ) as ex:
            for s in ex.map(_sample_job, jobs, chunksize=8):
                out.append(s)
    else:
        for j in jobs:
            out.append(_sample_job(j))
            if progress and len(out) % 200 == 0:
                log.info(
                    "pretrain.generated",
                    split=split,
                    n=len(out),
                    seconds=round(time.perf_counter() - t0, 1),
                )
    return out


class PresenceHead(nn.Module):
    """Per-finding presence from (max of its mask logit, pooled features): pretraining only."""

    def __init__(self, feature_dim: int, classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(classes))
        self.linear = nn.Linear(feature_dim, classes)

    def forward(self, feats: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return self.scale * seg.amax(dim=(2, 3, 4)) + self.linear(feats)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for i in range(0, n - batch_size + 1, batch_size):
        yield order[i : i + batch_size]


def _stack(samples: Sequence[Sample], idx: torch.Tensor, flip: torch.Tensor | None = None):
    x = torch.from_numpy(np.stack([samples[int(i)].x for i in idx])).float()
    m = torch.from_numpy(np.stack([samples[int(i)].mask for i in idx])).float()
    y = torch.from_numpy(np.stack([samples[int(i)].presence for i in idx]))
    if flip is not None and bool(flip.any()):  # left-right mirror (axis W of SPL)
        x[flip] = x[flip].flip(-1)
        m[flip] = m[flip].flip(-1)
    return x, m, y


def dense_loss(
    seg: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float
) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(seg, target, pos_weight=torch.tensor(pos_weight))
    p = torch.sigmoid(seg)
    dims = (2, 3, 4)
    inter = (p * target).sum(dims)
    denom = p.sum(dims) + target.sum(dims)
    present = target.sum(dims) > 0  # Dice only where the finding is planted
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    dice_term = dice[present].mean() if bool(present.any()) else seg.sum() * 0.0
    return bce + dice_weight * dice_term


@torch.no_grad()
def evaluate(
    net: nn.Module, head: PresenceHead, samples: Sequence[Sample], batch_size: int = 8
) -> dict[str, Any]:
    """Presence AUC per finding on `samples` and per site (the pretraining's own check)."""
    from molre.data.synth import PHANTOM_FINDINGS
    from molre.training.metrics import auc_matrix

    net.eval()
    probs, ys = [], []
    for i in range(0, len(samples), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(samples)))
        x, _, y = _stack(samples, idx)
        feats, seg = net.dense(x)
        probs.append(torch.sigmoid(head(feats, seg)).numpy())
        ys.append(y.numpy())
    p, y = np.concatenate(probs), np.concatenate(ys)
    per = dict(zip(PHANTOM_FINDINGS, auc_matrix(y, p)))
    vals = [v for v in per.values() if v is not None]
    sites = sorted({s.site for s in samples})
    by_site = {}
    for s in sites:
        sel = np.array([x.site == s for x in samples])
        aucs = [a for a in auc_matrix(y[sel], p[sel]) if a is not None]
        by_site[s] = round(float(np.mean(aucs)), 4) if aucs else None
    return {
        "macro_auc": round(float(np.mean(vals)), 4) if vals else None,
        "per_finding": {k: (round(v, 4) if v is not None else None) for k, v in per.items()},
        "by_site": by_site,
        "n": len(samples),
    }


@dataclass
class PretrainResult:
    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sha256: str = ""


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """The registry's weights digest of a state dict (what `weights_digest` gives the module)."""
    from molre.backbones.registry import state_digest

    return state_digest(state)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> PretrainResult:
    """Generate phantoms, train phantom-3d densely, return its weights and validation figures."""
    from molre.backbones.phantom import PhantomUNet
    from molre.data.synth import PHANTOM_FINDINGS
    from molre.training.schedule import warmup_cosine

    t_start = time.perf_counter()
    torch.set_num_threads(int(cfg.threads))
    train_set = generate(cfg, 0, cfg.train_phantoms, progress)
    val_set = generate(cfg, 1, cfg.val_phantoms, progress)
    t_data = time.perf_counter() - t_start
    log.info("pretrain.data", train=len(train_set), val=len(val_set), seconds=round(t_data, 1))

    torch.manual_seed(cfg.seed)
    net = PhantomUNet(num_classes=len(PHANTOM_FINDINGS))
    head = PresenceHead(net.pooled_dim, len(PHANTOM_FINDINGS))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * (len(train_set) // cfg.batch_size)
    sched = warmup_cosine(opt, steps, max(1, steps // 30))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        net.train()
        head.train()
        t0 = time.perf_counter()
        tot = {"dense": 0.0, "presence": 0.0}
        n = 0
        for idx in _batches(len(train_set), cfg.batch_size, gen):
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x, m, y = _stack(train_set, idx, flip)
            feats, seg = net.dense(x)
            ld = dense_loss(seg, m, cfg.pos_weight, cfg.dice_weight)
            lp = F.binary_cross_entropy_with_logits(head(feats, seg), y)
            loss = ld + cfg.presence_weight * lp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            sched.step()
            tot["dense"] += float(ld.detach())
            tot["presence"] += float(lp.detach())
            n += 1
        rec = {
            "epoch": epoch + 1,
            "dense_loss": round(tot["dense"] / max(n, 1), 5),
            "presence_loss": round(tot["presence"] / max(n, 1), 5),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if progress or epoch == cfg.epochs - 1:
            rec["val_macro_auc"] = evaluate(net, head, val_set)["macro_auc"]
        history.append(rec)
        log.info("pretrain.epoch", **rec)
    validation = evaluate(net, head, val_set)
    net.eval()
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return PretrainResult(
        state=state,
        history=history,
        validation=validation,
        seconds=time.perf_counter() - t_start,
        sha256=state_sha256(state),
    )


def save(result: PretrainResult, cfg: PretrainConfig, out: Path, command: str) -> Path:
    """Weights (safetensors) + card (config, validation, sha256, time, how to regenerate)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.state, str(out / WEIGHTS_FILE))
    file_sha = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    card = {
        "name": "phantom-3d",
        "what": (
            "compact 3-D U-Net pretrained with dense supervision (finding masks + presence) "
            "on synthetic multi-site head-CT phantoms; a stand-in for a CT foundation model. "
            "Synthetic data only: not for clinical use."
        ),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha,
        "state_sha256": result.sha256,
        "params": int(sum(t.numel() for t in result.state.values())),
        "config": cfg.to_dict(),
        "validation_presence_auc": result.validation,
        "history": result.history,
        "minutes": round(result.seconds / 60.0, 1),
        "regenerate": command,
        "torch": torch.__version__,
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m molre.training.pretrain",
        description="Pretrain phantom-3d (dense supervision on phantoms).",
    )
    p.add_argument("--out", type=Path, default=Path("molre/resources/phantom-3d"))
    defaults = PretrainConfig()
    for k, v in defaults.to_dict().items():
        if k == "sites":
            p.add_argument("--sites", default="", help="comma-separated sites (default: all)")
        else:
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    kw = {k: getattr(a, k) for k in defaults.to_dict() if k != "sites"}
    cfg = PretrainConfig(**kw, sites=tuple(x for x in a.sites.split(",") if x))
    res = pretrain(cfg, progress=not a.quiet)
    cmd = (
        "python -m molre.training.pretrain "
        + " ".join(
            f"--{k.replace('_', '-')} {v if k != 'sites' else ','.join(v)}"
            for k, v in cfg.to_dict().items()
            if v != defaults.to_dict()[k]
        )
        + f" --out {a.out}"
    )
    save(res, cfg, a.out, " ".join(cmd.split()))
    print(
        json.dumps(
            {
                "out": str(a.out),
                "sha256": res.sha256,
                "minutes": round(res.seconds / 60, 1),
                "val": res.validation,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
