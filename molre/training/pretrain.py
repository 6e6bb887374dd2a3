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
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.log import get_logger
from common.procs import process_pool
from molre.backbones.phantom import PHANTOM_ARCH

log = get_logger("molre.pretrain")

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


@dataclass
class PretrainConfig:
    """Everything that determines the weights (recorded in the card)."""

    seed: int = 0
    train_phantoms: int = 3000
    val_phantoms: int = 400
    epochs: int = 4
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    prevalence: float = 0.25
    normal_fraction: float = 0.15
    sites: tuple[str, ...] = ()  # empty = every built-in site
    pos_weight: float = 5.0
    dice_weight: float = 1.0
    #: weight of the size-normalised positive term of `dense_loss` (0 = off, the shipped run;
    #: docs/training.md has the ablation)
    pos_balance: float = 0.0
    #: per map of a normal phantom (nothing planted), the mean BCE of its this many highest
    #: cells is added to `dense_loss` (0 = off, the shipped run): a normal head must leave every
    #: map silent
    normal_hard_negatives: int = 0
    #: > 0: `pos_balance` applies only to planted findings with at most this many target cells
    pos_balance_max_cells: int = 0
    presence_weight: float = 0.5
    threads: int = 2
    workers: int = 2  # generator processes (the data do not depend on it)
    arch: str = PHANTOM_ARCH  # PHANTOM_ARCHS: network widths and input grid
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast (GPU)
    #: minutes for the whole run; > 0 picks the number of epochs (at most `epochs`) from the speed
    #: of the first one, and the card's `regenerate` command names the number chosen
    time_budget_min: float = 0.0

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

    `job` = (seed, split, index, prevalence, normal_fraction, sites[, with_masks=True[, arch]]);
    without masks (benchmarks that need only the input and labels) the mask array is empty."""
    from molre.backbones.phantom import PHANTOM_ARCH, phantom_recipe
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
    arch = str(job[7]) if len(job) > 7 else PHANTOM_ARCH
    rng = np.random.default_rng([seed, split, i])
    names = check_sites(sites)
    site = names[int(rng.integers(len(names)))]
    found = sample_findings(rng, _prevalences(prevalence, PHANTOM_FINDINGS), normal_fraction)
    r = render(rng, found, size=None, site=site)
    recipe = Recipe.from_dict(phantom_recipe(arch))
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


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per generator process


def _jobs(cfg: PretrainConfig, split: int, count: int) -> list[tuple]:
    return [
        (cfg.seed, split, i, cfg.prevalence, cfg.normal_fraction, tuple(cfg.sites), True, cfg.arch)
        for i in range(count)
    ]


def stream(cfg: PretrainConfig, split: int, count: int) -> Iterator[Sample]:
    """`count` samples of split 0 (train) / 1 (validation), yielded in index order as the
    generator processes finish them (the data do not depend on the number of processes)."""
    jobs = _jobs(cfg, split, count)
    if cfg.workers > 1:
        with process_pool(cfg.workers, initializer=_worker_init) as ex:
            yield from ex.map(_sample_job, jobs, chunksize=4)
    else:
        for j in jobs:
            yield _sample_job(j)


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


class SampleStore:
    """Samples as tensors on the training device (input float16, masks uint8), filled in order."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device, self.n = int(capacity), device, 0
        self.sites: list[str] = []
        self.x = self.m = self.y = torch.empty(0)

    def add(self, s: Sample) -> None:
        if self.n == 0:
            d = self.device
            self.x = torch.empty((self.capacity, *s.x.shape), dtype=torch.float16, device=d)
            self.m = torch.empty((self.capacity, *s.mask.shape), dtype=torch.uint8, device=d)
            self.y = torch.empty((self.capacity, len(s.presence)), dtype=torch.float32, device=d)
        self.x[self.n] = torch.from_numpy(s.x)
        self.m[self.n] = torch.from_numpy(s.mask)
        self.y[self.n] = torch.from_numpy(s.presence)
        self.sites.append(s.site)
        self.n += 1

    def batch(
        self, idx: torch.Tensor, flip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = idx.to(self.device)
        x, m, y = self.x[idx].float(), self.m[idx].float(), self.y[idx]
        if flip is not None:  # left-right mirror (axis W of SPL)
            f = flip.to(self.device).view(-1, 1, 1, 1, 1)
            x = torch.where(f, x.flip(-1), x)
            m = torch.where(f, m.flip(-1), m)
        return x, m, y


def dense_loss(
    seg: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float,
    dice_weight: float,
    pos_balance: float = 0.0,
    hard_negatives: int = 0,
    pos_balance_max_cells: int = 0,
) -> torch.Tensor:
    """Voxel BCE (positives weighted `pos_weight`) + soft Dice on planted findings, and two
    optional per-map terms (both off in the shipped run):

    - `pos_balance` x the mean BCE of each planted finding's own positive cells. In a voxel mean
      a calcification's one or two target cells weigh nothing next to an edema's hundreds: the
      shipped backbone switched its calcification and skull-fracture maps off everywhere (logits
      about -11, where the sigmoid's gradient vanishes and Dice cannot bring them back; presence
      AUC 0.55 / 0.57). This term gives a one-cell finding the pull of a large one; with
      `pos_balance_max_cells` > 0 only findings with at most that many target cells get it.
    - the mean BCE of the `hard_negatives` highest cells of every map of a phantom with nothing
      planted: a normal head must leave every map silent (with positives balanced alone, the
      revived maps also fired on normal heads, peak logits +4..+6).

    docs/training.md has the ablation: what each did to the backbone and to the demo."""
    bce = F.binary_cross_entropy_with_logits(
        seg, target, pos_weight=torch.tensor(pos_weight, device=seg.device)
    )
    p = torch.sigmoid(seg)
    dims = (2, 3, 4)
    inter = (p * target).sum(dims)
    n_pos = target.sum(dims)
    denom = p.sum(dims) + n_pos
    present = n_pos > 0  # Dice only where the finding is planted
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    n_present = present.sum().clamp(min=1)
    # mean over planted (sample, finding) pairs, without a host sync on the GPU
    dice_term = (dice * present).sum() / n_present
    loss = bce + dice_weight * dice_term
    if pos_balance > 0:
        pos = (F.softplus(-seg) * target).sum(dims) / n_pos.clamp(min=1)  # -log sigmoid
        small = (
            present if pos_balance_max_cells <= 0 else present & (n_pos <= pos_balance_max_cells)
        )
        loss = loss + pos_balance * (pos * small).sum() / n_present
    if hard_negatives > 0:
        normal = ~present.any(dim=1)  # samples with nothing planted
        top = seg.flatten(2).topk(min(hard_negatives, seg[0, 0].numel()), dim=-1).values
        per = F.softplus(top).mean(dim=(1, 2))  # -log(1 - sigmoid), per sample
        loss = loss + (per * normal).sum() / normal.sum().clamp(min=1)
    return loss


@torch.no_grad()
def evaluate(
    net: nn.Module,
    head: PresenceHead,
    val: SampleStore,
    batch_size: int = 8,
    amp: bool = False,
) -> dict[str, Any]:
    """Presence AUC per finding on `val` and per site (the pretraining's own check)."""
    from molre.data.synth import PHANTOM_FINDINGS
    from molre.training.metrics import auc_matrix

    net.eval()
    head.eval()
    probs, ys = [], []
    for i in range(0, val.n, batch_size):
        x, _, y = val.batch(torch.arange(i, min(i + batch_size, val.n)))
        with torch.autocast(val.device.type, dtype=torch.bfloat16, enabled=amp):
            feats, seg = net.dense(x)
            logits = head(feats, seg)
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        ys.append(y.cpu().numpy())
    p, y = np.concatenate(probs), np.concatenate(ys)
    per = dict(zip(PHANTOM_FINDINGS, auc_matrix(y, p)))
    vals = [v for v in per.values() if v is not None]
    by_site = {}
    for site in sorted(set(val.sites)):
        sel = np.array([x == site for x in val.sites])
        aucs = [a for a in auc_matrix(y[sel], p[sel]) if a is not None]
        by_site[site] = round(float(np.mean(aucs)), 4) if aucs else None
    return {
        "macro_auc": round(float(np.mean(vals)), 4) if vals else None,
        "per_finding": {k: (round(v, 4) if v is not None else None) for k, v in per.items()},
        "by_site": by_site,
        "n": val.n,
    }


@dataclass
class PretrainResult:
    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sha256: str = ""
    epochs: int = 0  # epochs run (the time budget may have chosen fewer than configured)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """The registry's weights digest of a state dict (what `weights_digest` gives the module)."""
    from molre.backbones.registry import state_digest

    return state_digest(state)


def lr_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    """Linear warm-up (a fifth of an epoch), constant to the end of the first epoch, then cosine
    to zero over the remaining epochs (a single epoch has no decay). The first epoch does not
    depend on how many follow, which lets a time budget choose that number once the first epoch
    has shown the speed, and the card's command with that number reproduces the run."""
    warm = max(1, steps_per_epoch // 5)
    if step < warm:
        return (step + 1) / warm
    start = steps_per_epoch
    if step < start or epochs <= 1:
        return 1.0
    total = max(start + 1, epochs * steps_per_epoch)
    frac = min(1.0, (step - start) / (total - start))
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def _losses(
    net: nn.Module,
    head: nn.Module,
    x: torch.Tensor,
    m: torch.Tensor,
    y: torch.Tensor,
    cfg: PretrainConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense loss, presence loss) of one batch (bfloat16 autocast with `cfg.amp`)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        feats, seg = net.dense(x)
        logits = head(feats, seg)
    ld = dense_loss(
        seg.float(),
        m,
        cfg.pos_weight,
        cfg.dice_weight,
        cfg.pos_balance,
        cfg.normal_hard_negatives,
        cfg.pos_balance_max_cells,
    )
    return ld, F.binary_cross_entropy_with_logits(logits.float(), y)


def _probe_step_seconds(
    net: nn.Module,
    head: nn.Module,
    train: SampleStore,
    cfg: PretrainConfig,
    sync: Callable[[], None],
    steps: int = 4,
) -> float:
    """Seconds per training step, measured on copies of the network, head and optimizer (the
    run itself, its random streams and its weights are untouched)."""
    import copy

    net2, head2 = copy.deepcopy(net), copy.deepcopy(head)
    params = list(net2.parameters()) + list(head2.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, m, y = train.batch(torch.arange(min(cfg.batch_size, train.n)))
    t0 = 0.0
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            sync()
            t0 = time.perf_counter()
        ld, lp = _losses(net2, head2, x, m, y, cfg)
        opt.zero_grad(set_to_none=True)
        (ld + cfg.presence_weight * lp).backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}


def pretrain(
    cfg: PretrainConfig,
    progress: bool = True,
    on_epoch: Callable[[PretrainResult], None] | None = None,
) -> PretrainResult:
    """Generate phantoms, train phantom-3d densely, return its weights and validation figures.

    The first epoch trains on the phantoms as the generator processes deliver them (in index
    order); later epochs reshuffle the stored set. `on_epoch` gets the result so far after each
    epoch (to save a snapshot)."""
    from molre.backbones.phantom import PhantomUNet, phantom_sizes
    from molre.data.synth import PHANTOM_FINDINGS

    t_start = time.perf_counter()
    torch.set_num_threads(int(cfg.threads))
    dev = torch.device(cfg.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    val = SampleStore(cfg.val_phantoms, dev)
    for s in stream(cfg, 1, cfg.val_phantoms):
        val.add(s)
    log.info("pretrain.validation_data", n=val.n, seconds=round(time.perf_counter() - t_start, 1))

    torch.manual_seed(cfg.seed)
    k = len(PHANTOM_FINDINGS)
    net = PhantomUNet(**phantom_sizes(cfg.arch), num_classes=k).to(dev)
    head = PresenceHead(net.pooled_dim, k).to(dev)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    spe = max(1, cfg.train_phantoms // cfg.batch_size)
    plan = {"epochs": int(cfg.epochs)}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, spe, plan["epochs"])
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train = SampleStore(cfg.train_phantoms, dev)
    history: list[dict[str, Any]] = []

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x, m, y = train.batch(idx, flip)
        ld, lp = _losses(net, head, x, m, y, cfg)
        loss = ld + cfg.presence_weight * lp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        sched.step()
        return ld.detach(), lp.detach()

    def first_epoch() -> Iterator[torch.Tensor]:
        """Batches of consecutive indices as the phantoms arrive."""
        t0 = time.perf_counter()
        for s in stream(cfg, 0, cfg.train_phantoms):
            train.add(s)
            if progress and train.n % 1000 == 0:
                dt = time.perf_counter() - t0
                log.info("pretrain.generated", n=train.n, per_s=round(train.n / dt, 1))
            if train.n % cfg.batch_size == 0:
                yield torch.arange(train.n - cfg.batch_size, train.n)

    epoch = 0
    validation: dict[str, Any] = {}
    while epoch < plan["epochs"]:
        net.train()
        head.train()
        t0 = time.perf_counter()
        tot_d = torch.zeros((), device=dev)
        tot_p = torch.zeros((), device=dev)
        n = 0
        batches = first_epoch() if epoch == 0 else _batches(train.n, cfg.batch_size, gen)
        for idx in batches:
            ld, lp = step(idx)
            tot_d += ld
            tot_p += lp
            n += 1
        sync()
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "dense_loss": round(float(tot_d) / max(n, 1), 5),
            "presence_loss": round(float(tot_p) / max(n, 1), 5),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        te = time.perf_counter()
        last = epoch + 1 == plan["epochs"]
        if progress or last:
            validation = evaluate(net, head, val, amp=cfg.amp)
            rec["val_macro_auc"] = validation["macro_auc"]
        t_eval = time.perf_counter() - te
        if epoch == 0 and cfg.time_budget_min > 0 and plan["epochs"] > 1:
            # later epochs only train: time a few steps on a throw-away copy (the first epoch's
            # steps shared the cores with the generator processes and overstate the cost)
            per_step = _probe_step_seconds(net, head, train, cfg, sync)
            per_epoch = 1.05 * spe * per_step + t_eval
            left = cfg.time_budget_min * 60.0 - (time.perf_counter() - t_start) - 2 * t_eval - 10
            plan["epochs"] = max(1, min(plan["epochs"], 1 + int(left // max(per_epoch, 1e-6))))
            rec["epochs_planned"] = plan["epochs"]
            rec["step_ms"] = round(1000 * per_step, 2)
        history.append(rec)
        log.info("pretrain.epoch", **rec)
        epoch += 1
        if on_epoch is not None:
            on_epoch(
                PretrainResult(
                    state=_snapshot(net),
                    history=list(history),
                    validation=validation,
                    seconds=time.perf_counter() - t_start,
                    epochs=epoch,
                )
            )
    if not validation or "val_macro_auc" not in history[-1]:
        validation = evaluate(net, head, val, amp=cfg.amp)
    net.eval()
    state = _snapshot(net)
    return PretrainResult(
        state=state,
        history=history,
        validation=validation,
        seconds=time.perf_counter() - t_start,
        sha256=state_sha256(state),
        epochs=epoch,
    )


def save(
    result: PretrainResult, cfg: PretrainConfig, out: Path, command: str, complete: bool = True
) -> Path:
    """Weights (safetensors) + card (config, validation, sha256, time, how to regenerate).
    `complete=False` marks a snapshot taken after an epoch of a run still going."""
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
        "state_sha256": result.sha256 or state_sha256(result.state),
        "params": int(sum(t.numel() for t in result.state.values())),
        "config": cfg.to_dict(),
        "complete": complete,
        "epochs_run": result.epochs,
        "validation_presence_auc": result.validation,
        "history": result.history,
        "minutes": round(result.seconds / 60.0, 1),
        "regenerate": command,
        "torch": torch.__version__,
        "device": _device_name(cfg.device),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _flag(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def regenerate_command(cfg: PretrainConfig, out: Path) -> str:
    """The command that reproduces `cfg` (every value that differs from the defaults)."""
    d = PretrainConfig().to_dict()
    args = [
        f"--{k.replace('_', '-')} {','.join(v) if k == 'sites' else v}"
        for k, v in cfg.to_dict().items()
        if v != d[k]
    ]
    return " ".join(["python -m molre.training.pretrain", *args, f"--out {out}"])


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
            kind = _flag if isinstance(v, bool) else type(v)
            p.add_argument(f"--{k.replace('_', '-')}", type=kind, default=v)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    kw = {k: getattr(a, k) for k in defaults.to_dict() if k != "sites"}
    cfg = PretrainConfig(**kw, sites=tuple(x for x in a.sites.split(",") if x))

    def snapshot(r: PretrainResult) -> None:
        # a run still going: the card names the command as launched (its `epochs_run` says how
        # far it got); only the finished run's card names the epochs a budget chose
        save(r, cfg, a.out, regenerate_command(cfg, a.out), complete=False)

    res = pretrain(cfg, progress=not a.quiet, on_epoch=snapshot)
    # what was run: the epochs the time budget chose, no budget (the command is exact)
    ran = replace(cfg, epochs=res.epochs, time_budget_min=0.0) if cfg.time_budget_min > 0 else cfg
    save(res, ran, a.out, regenerate_command(ran, a.out))
    print(
        json.dumps(
            {
                "out": str(a.out),
                "sha256": res.sha256,
                "epochs": res.epochs,
                "minutes": round(res.seconds / 60, 1),
                "val": res.validation,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
