"""Regenerate the packaged demo checkpoint: ``python -m molre.demo_checkpoint --out molre/resources/demo``.

The demo lets the node run end to end on a machine with no licensed weights: backbone `tiny-3d`
(random init from a fixed seed, BatchNorm statistics calibrated on the training phantoms, base
weights shipped as ``backbone.safetensors`` so the digest check never depends on a torch
version's RNG), MoLRE(6 experts, rank 8) adapters and a head for the 12 findings the synthetic
phantoms plant, trained on seeded synthetic phantoms (`molre.data.synth.generate_dataset`).

Its model card says ``is_demo: true`` and "synthetic training data — not for clinical use"; the
node prints / embeds that disclaimer. Everything is seeded: the same arguments give the same data
and the same training trajectory on the same torch build (bitwise identity across torch versions
or CPU types is not promised — hence the shipped backbone weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

from molre.log import get_logger

log = get_logger("molre.demo_checkpoint")

#: Preprocessing of the demo: tiny-3d's grid with a soft-tissue window, so the head's small
#: random backbone sees brain contrast (the full −1024…2048 HU range of CT-FM leaves ~1 % of it).
DEMO_RECIPE = {"hu_range": [0.0, 100.0]}
DEMO_DEFAULTS = dict(count=160, size=64, epochs=8, seed=0, lr=2e-3, batch_size=4,
                     experts=6, rank=8, alpha=16.0)
#: Stand-in for foundation-model pretraining (`molre.training.pretrain`): the whole tiny-3d is
#: trained on PRETRAIN_FINDINGS of a separate phantom set (seed + PRETRAIN_SEED_OFFSET), then
#: frozen. 0 epochs (the default, and how the packaged demo is built) = random init + BatchNorm
#: calibration: a few CPU minutes of pretraining did not get past chance on the phantoms'
#: hemorrhages (docs/training.md, "Pretraining tiny-3d"), so it would not improve the demo.
PRETRAIN_DEFAULTS = dict(pretrain_count=240, pretrain_epochs=0, pretrain_lr=1e-3,
                         pretrain_batch_size=4)
PRETRAIN_SEED_OFFSET = 1000


def build_demo(out: Path, count: int, size: int, epochs: int, seed: int, lr: float,
               batch_size: int, experts: int, rank: int, alpha: float,
               work: Path | None = None, workers: int = 1, progress: bool = True,
               pretrain_count: int = PRETRAIN_DEFAULTS["pretrain_count"],
               pretrain_epochs: int = PRETRAIN_DEFAULTS["pretrain_epochs"],
               pretrain_lr: float = PRETRAIN_DEFAULTS["pretrain_lr"],
               pretrain_batch_size: int = PRETRAIN_DEFAULTS["pretrain_batch_size"]) -> Path:
    """(Pretrain tiny-3d on a separate phantom set,) generate the adapter phantoms, train
    MoLRE adapters + head on the frozen backbone, copy the best checkpoint to `out`."""
    from molre.checkpoint import (ADAPTER_FILE, BACKBONE_FILE, CARD_FILE, DEMO_DISCLAIMER,
                                  load_checkpoint)
    from molre.data.synth import PHANTOM_FINDINGS, generate_dataset
    from molre.training import TrainConfig, train

    tmp = None
    if work is None:
        tmp = tempfile.mkdtemp(prefix="molre-demo-")
        work = Path(tmp)
    work = Path(work)
    try:
        t0 = time.perf_counter()
        data = work / "synth"
        if not (data / "manifest.csv").is_file():
            generate_dataset(data, count=count, seed=seed, size=size, prevalence=0.3,
                             normal_fraction=0.2, workers=workers, overwrite=True,
                             progress=progress)
        pre_info = None
        weights = None
        if pretrain_epochs > 0:
            from safetensors.torch import save_file

            from molre.training.pretrain import pretrain_backbone

            pdata = work / "pretrain"
            pseed = seed + PRETRAIN_SEED_OFFSET
            if not (pdata / "manifest.csv").is_file():
                generate_dataset(pdata, count=pretrain_count, seed=pseed, size=size,
                                 prevalence=0.3, normal_fraction=0.2, workers=workers,
                                 overwrite=True, progress=progress)
            pre = pretrain_backbone(pdata / "manifest.csv", dict(DEMO_RECIPE), work / "pcache",
                                    epochs=pretrain_epochs, lr=pretrain_lr,
                                    batch_size=pretrain_batch_size, seed=pseed,
                                    progress=progress)
            weights = work / "pretrained-tiny-3d.safetensors"
            save_file(pre.state, str(weights))
            pre_info = {"what": "stand-in for foundation-model pretraining: whole backbone + a "
                                "temporary linear head, fully supervised, then frozen",
                        "findings": pre.findings, "phantoms": pretrain_count,
                        "phantom_seed": pseed, "epochs": pretrain_epochs, "lr": pretrain_lr,
                        "batch_size": pretrain_batch_size, "volumes": pre.volumes,
                        "val_macro_auc_pretrain_findings": pre.val_macro_auc,
                        "minutes": round(pre.seconds / 60, 1)}
            log.info("demo.pretrained", val_macro_auc=pre.val_macro_auc,
                     minutes=pre_info["minutes"])
        run = work / "run"
        if run.exists():
            shutil.rmtree(run)
        cfg = TrainConfig(
            backbone="tiny-3d", data=data / "manifest.csv", out=run, adapter="molre",
            experts=experts, rank=rank, alpha=alpha, epochs=epochs, batch_size=batch_size,
            lr=lr, seed=seed, device="cpu", workers=0, progress=progress,
            weights=str(weights) if weights else None, save_backbone=True,
            catalog_keys=list(PHANTOM_FINDINGS), recipe=dict(DEMO_RECIPE),
            model_name="molre-tiny-3d-demo", is_demo=True,
            intended_use=("Demonstration and integration testing of molre-node only "
                          "(DICOM in, SR out). Not for any clinical or research decision."),
            disclaimer=DEMO_DISCLAIMER,
        )
        res = train(cfg)
        src = res.best_dir or res.last_dir
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_FILE, CARD_FILE, BACKBONE_FILE):
            shutil.copy2(src / name, out / name)
        card = json.loads((out / CARD_FILE).read_text(encoding="utf-8"))
        card["demo_build"] = {"command": "python -m molre.demo_checkpoint --out molre/resources/demo",
                              "count": count, "size": size, "epochs": epochs, "seed": seed,
                              "lr": lr, "batch_size": batch_size,
                              "minutes": round((time.perf_counter() - t0) / 60, 1)}
        if pre_info is not None:
            card["demo_build"]["pretrain"] = pre_info
            card["backbone"]["weights_source"] = "tiny-3d pretrained on synthetic phantoms (demo)"
            card["backbone"]["pretraining"] = pre_info
            card["backbone"]["init_seed"] = pre_info["phantom_seed"]  # torch seed of the init
        # the card changed -> re-save through save_checkpoint so the hash covers it
        loaded = load_checkpoint(out)
        from molre.checkpoint import save_checkpoint

        from safetensors.torch import load_file

        bb_state = load_file(str(out / BACKBONE_FILE))
        h = save_checkpoint(out, loaded.model, card, backbone_state=bb_state)
        log.info("demo.done", out=str(out), checkpoint_hash=h[:16],
                 val_macro_auc=card.get("metrics", {}).get("macro_auc"))
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m molre.demo_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("molre/resources/demo"))
    p.add_argument("--work", type=Path, default=None, help="keep phantoms and the run here")
    p.add_argument("--workers", type=int, default=1, help="processes for phantom generation")
    for k, v in {**DEMO_DEFAULTS, **PRETRAIN_DEFAULTS}.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    build_demo(a.out, a.count, a.size, a.epochs, a.seed, a.lr, a.batch_size, a.experts, a.rank,
               a.alpha, work=a.work, workers=a.workers, progress=not a.no_progress,
               **{k: getattr(a, k) for k in PRETRAIN_DEFAULTS})


if __name__ == "__main__":
    main()
