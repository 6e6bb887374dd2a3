"""Supervised pretraining of a small backbone: the stand-in for foundation-model pretraining.

Why: the real workflow is "pretrain a backbone once (CT-FM), freeze it, adapt it to new findings
with LoRA / MoLRE". Here no pretrained weights can be downloaded, and a random-init tiny-3d is
useless as a frozen feature extractor (its pooled features barely differ between volumes), so the
demo and the benchmark pretrain tiny-3d themselves: the *whole* backbone plus a temporary linear
head is trained with full supervision on a SUBSET of the phantom findings, on a phantom set
generated with a different seed from the one the adapters are trained on. The head is then
thrown away and the backbone is frozen; adapters trained afterwards on all findings show whether
they can reach findings the backbone never saw (`PRETRAIN_FINDINGS` vs `HELD_OUT_FINDINGS`).

Everything is seeded (init, shuffling), so the same data and arguments give the same weights on
the same torch build. BatchNorm statistics are re-estimated on the pretraining volumes at the end
(one cumulative pass), so the frozen backbone's eval-mode behaviour matches its training data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from molre.data.synth import PHANTOM_FINDINGS
from molre.errors import MolreError
from molre.log import get_logger

__all__ = ["PRETRAIN_FINDINGS", "HELD_OUT_FINDINGS", "PretrainResult", "pretrain_backbone"]

log = get_logger("molre.pretrain")

#: What the stand-in "foundation model" is pretrained on: the hemorrhage family — the
#: hyperdense-blood features a CT foundation model would know.
PRETRAIN_FINDINGS: tuple[str, ...] = (
    "intraparenchymal_hemorrhage",
    "subdural_hemorrhage",
    "epidural_hematoma",
    "intraventricular_hemorrhage",
    "subarachnoid_hemorrhage",
)
#: The phantom findings the backbone never sees a label for: where adapters have to earn their keep.
HELD_OUT_FINDINGS: tuple[str, ...] = tuple(k for k in PHANTOM_FINDINGS if k not in PRETRAIN_FINDINGS)


@dataclass
class PretrainResult:
    state: dict[str, torch.Tensor]  # backbone state dict (BatchNorm re-estimated), CPU tensors
    findings: list[str]
    history: list[dict] = field(default_factory=list)
    val_macro_auc: float | None = None
    seconds: float = 0.0
    volumes: dict[str, int] = field(default_factory=dict)


def pretrain_backbone(manifest: Path, recipe: dict[str, Any] | None, cache_dir: Path,
                      findings: Sequence[str] = PRETRAIN_FINDINGS, backbone: str = "tiny-3d",
                      epochs: int = 6, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
                      progress: bool = False, limit: int | None = None) -> PretrainResult:
    """Train backbone + a temporary linear head on `findings` of `manifest`; return the backbone.

    All rows of the manifest except split=test are used: val rows only to report the AUC the
    pretraining reached (it is a sanity check, not model selection — the last epoch is kept).
    """
    from molre.backbones import create_backbone
    from molre.cache import VolumeCache
    from molre.catalog import load_catalog
    from molre.data.manifest import read_manifest
    from molre.losses import focal_loss, prevalence_weights
    from molre.training.loop import (_CachedDataset, _build_recipe, _norm_split,
                                     calibrate_batchnorm, summarise_auc)
    from molre.training.schedule import warmup_cosine

    t_start = time.perf_counter()
    cat = load_catalog()
    unknown = [k for k in findings if k not in cat.keys]
    if unknown:
        raise MolreError(f"pretrain findings {unknown} are not keys of the catalog")
    rows = read_manifest(Path(manifest), cat)[:limit]  # limit: first rows only (tests)
    cols = [cat.index(k) for k in findings]
    torch.manual_seed(seed)
    net = create_backbone(backbone)
    rec = _build_recipe(net, recipe)
    cache = VolumeCache(Path(cache_dir), rec)
    splits = [_norm_split(getattr(r, "split", None)) for r in rows]
    use = [i for i, s in enumerate(splits) if s in ("train", "val")]
    report = cache.build([str(rows[i].path) for i in use], progress=progress)
    ok = [i for i in use if str(rows[i].path) in report.paths]
    tr = [i for i in ok if splits[i] == "train"]
    va = [i for i in ok if splits[i] == "val"]
    if not tr:
        raise MolreError(f"{manifest}: no usable split=train series to pretrain on")
    labels = np.stack([np.asarray(r.labels, dtype=np.float32)[cols] for r in rows])
    ds_tr = _CachedDataset([report.paths[str(rows[i].path)] for i in tr], labels[tr])
    ds_va = _CachedDataset([report.paths[str(rows[i].path)] for i in va], labels[va])

    torch.manual_seed(seed + 1)
    head = nn.Linear(net.feature_dim, len(findings))
    model = nn.Sequential(net, head)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(ds_tr) + batch_size - 1) // batch_size)
    sched = warmup_cosine(opt, steps, max(1, steps // 20))
    pos_weight = prevalence_weights(labels[tr], 10.0)
    gen = torch.Generator()
    history: list[dict] = []
    macro = None

    class _Cat:  # the minimal catalog view summarise_auc needs
        keys = list(findings)

        def __iter__(self):
            return iter(cat.get(k) for k in findings)

    for epoch in range(epochs):
        gen.manual_seed(seed * 7919 + epoch)
        model.train()
        t0 = time.perf_counter()
        tot, n = 0.0, 0
        for x, y, _ in DataLoader(ds_tr, batch_size=batch_size, shuffle=True, generator=gen,
                                  drop_last=len(ds_tr) > batch_size):
            loss = focal_loss(model(x), y, gamma=0.0, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(x)
            n += len(x)
        rec_e: dict[str, Any] = {"epoch": epoch + 1, "train_loss": tot / max(n, 1),
                                 "seconds": round(time.perf_counter() - t0, 2)}
        if len(ds_va) and (epoch == epochs - 1 or progress):
            macro = _val_auc(model, ds_va, labels[va], batch_size, _Cat(), summarise_auc)
            rec_e["val_macro_auc"] = macro
        history.append(rec_e)
        log.info("pretrain.epoch", **rec_e)
    # re-estimate BatchNorm statistics for the final weights (cumulative, not momentum-lagged)
    calibrate_batchnorm(net, ds_tr, batch_size, torch.device("cpu"))
    if len(ds_va):
        macro = _val_auc(model, ds_va, labels[va], batch_size, _Cat(), summarise_auc)
        history[-1]["val_macro_auc_after_bn"] = macro
    net.eval()
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return PretrainResult(state=state, findings=list(findings), history=history,
                          val_macro_auc=macro, seconds=time.perf_counter() - t_start,
                          volumes={"train": len(tr), "val": len(va),
                                   "failed": len(report.failures)})


@torch.no_grad()
def _val_auc(model: nn.Module, ds, y: np.ndarray, batch_size: int, cat, summarise) -> float | None:
    model.eval()
    probs = [torch.sigmoid(model(x)).numpy() for x, _, _ in DataLoader(ds, batch_size=batch_size)]
    return summarise(y, np.concatenate(probs, 0), cat)["macro_auc"]
