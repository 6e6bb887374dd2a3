"""CLI commands: train / evaluate / compare / infer.

Thin on purpose: options are parsed here and handed to `molre.training`, `molre.evaluate` and
`molre.checkpoint`, which raise `MolreError` for anything a user can fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("train")
    def train_cmd(
        data: Path = typer.Option(
            ...,
            "--data",
            help="Manifest CSV (path, patient_id, split, one column per finding key; DICOM folders or NIfTI files).",
        ),
        out: Path = typer.Option(
            Path("runs/run"), "--out", help="Run directory: last/, best/, metrics.jsonl, cache/."
        ),
        backbone: str = typer.Option(
            "tiny-3d", "--backbone", help="Backbone name (see `molre-node backbones`)."
        ),
        weights: Optional[str] = typer.Option(
            None,
            "--weights",
            help="Local backbone weights (file, folder or hf://repo in an offline cache). Required for pretrained backbones (ct-fm, dinov3-*, medsiglip) unless --random-init.",
        ),
        random_init: bool = typer.Option(
            False,
            "--random-init",
            help="Train a pretrained-backbone architecture from random init without --weights (pipeline tests only; the model means nothing).",
        ),
        preset: str = typer.Option(
            "paper",
            "--preset",
            help="Adapter placement: paper (default: patch embedding + every attention block / CT-FM's stem and deep convs) or light (< 0.5 % parameters); see `molre-node backbones`.",
        ),
        slices: Optional[int] = typer.Option(
            None,
            "--slices",
            help="2D backbones: sample N slices evenly instead of reading every slice of the series (the default).",
        ),
        adapter: str = typer.Option(
            "molre", "--adapter", help="molre | lora | none (linear probe)."
        ),
        experts: int = typer.Option(6, "--experts", help="MoLRE experts K."),
        rank: int = typer.Option(
            8, "--rank", help="Rank r of each expert (LoRA rank for --adapter lora)."
        ),
        alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scaling alpha/r)."),
        epochs: int = typer.Option(10, "--epochs"),
        batch_size: int = typer.Option(4, "--batch-size", help="Volumes per step per process."),
        lr: float = typer.Option(
            5e-4, "--lr", help="Peak learning rate (AdamW, warm-up + cosine)."
        ),
        accumulate: int = typer.Option(1, "--accumulate", help="Gradient accumulation steps."),
        augment: str = typer.Option(
            "none",
            "--augment",
            help="Training augmentation: none (default) or flip (mirror left-right with p 0.5; for catalogs whose findings name no side).",
        ),
        workers: int = typer.Option(
            0, "--workers", help="DataLoader / preprocessing worker processes."
        ),
        seed: int = typer.Option(0, "--seed"),
        resume: Optional[Path] = typer.Option(
            None, "--resume", help="Continue the run in this directory from last/."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …"),
        catalog: Optional[Path] = typer.Option(
            None,
            "--catalog",
            help="Site finding catalog (.json/.csv); default = packaged 75 findings.",
        ),
        cache_dir: Optional[Path] = typer.Option(
            None, "--cache-dir", help="Preprocessed-tensor cache (default OUT/cache)."
        ),
        limit: Optional[int] = typer.Option(
            None, "--limit", help="Use only the first N manifest rows (debugging)."
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    ) -> None:
        """Train adapters on a frozen backbone; writes OUT/best (for the node) and OUT/last."""
        from molre.training import TrainConfig, train

        recipe = None
        if slices is not None:
            from common.errors import ConfigError
            from molre.backbones import get_spec

            if get_spec(backbone).dims != 2:
                raise ConfigError(
                    f"--slices applies to 2D backbones; {backbone!r} reads the whole volume in 3D"
                )
            if slices < 1:
                raise ConfigError("--slices must be >= 1 (omit it to read every slice)")
            recipe = {"n_slices": slices}
        if random_init and weights is None:
            typer.echo(
                f"WARNING: --random-init: {backbone} is trained from RANDOM weights, not the "
                "pretrained foundation model; the result is for pipeline tests only.",
                err=True,
            )
        cfg = TrainConfig(
            backbone=backbone,
            data=data,
            out=resume or out,
            weights=weights,
            random_init=random_init,
            preset=preset,
            recipe=recipe,
            adapter=adapter,
            experts=experts,
            rank=rank,
            alpha=alpha,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            accumulate=accumulate,
            augment=augment,
            workers=workers,
            seed=seed,
            resume=resume,
            device=device,
            catalog=catalog,
            cache_dir=cache_dir,
            limit=limit,
            progress=not no_progress,
        )
        res = train(cfg)
        import os

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun
            dist.destroy_process_group()

        if int(os.environ.get("RANK", "0")) == 0:
            auc = "n/a" if res.best_val_macro_auc is None else f"{res.best_val_macro_auc:.4f}"
            typer.echo(f"best epoch {res.best_epoch} (val macro AUC {auc}) -> {res.best_dir}")
            typer.echo(f"metrics: {res.out / 'metrics.jsonl'}")

    @app.command("evaluate")
    def evaluate_cmd(
        checkpoint: Path = typer.Option(
            ...,
            "--checkpoint",
            help="Checkpoint dir or run dir (uses best/); 'demo' = the packaged demo.",
        ),
        data: Path = typer.Option(..., "--data", help="Manifest CSV."),
        out: Path = typer.Option(
            ...,
            "--out",
            help="Output directory for metrics.json, report.md, predictions.csv, roc/.",
        ),
        split: str = typer.Option("test", "--split", help="Manifest split to evaluate (or 'all')."),
        bootstrap: int = typer.Option(
            1000, "--bootstrap", help="Bootstrap resamples (by case) for CIs."
        ),
        seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
        weights: Optional[str] = typer.Option(
            None,
            "--weights",
            help="Backbone weights if not found from the card (file, folder or hf://repo in an offline cache, as for train).",
        ),
        cache_dir: Optional[Path] = typer.Option(
            None, "--cache-dir", help="Reuse / fill a preprocessed-tensor cache."
        ),
        device: str = typer.Option("cpu", "--device"),
        batch_size: int = typer.Option(4, "--batch-size"),
    ) -> None:
        """Per-finding AUC with bootstrap CIs, macro/category AUC, sens/spec, ROC plots."""
        from molre.evaluate import evaluate_checkpoint

        m = evaluate_checkpoint(
            checkpoint,
            data,
            out,
            split=split,
            n_boot=bootstrap,
            seed=seed,
            cache_dir=cache_dir,
            device=device,
            weights=weights,
            batch_size=batch_size,
        )
        macro = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
        ci = (
            ""
            if m["macro_ci_low"] is None
            else f" [{m['macro_ci_low']:.4f}, {m['macro_ci_high']:.4f}]"
        )
        typer.echo(
            f"{m['n_cases']} cases, macro AUC {macro}{ci}; report: {Path(out) / 'report.md'}"
        )

    @app.command("compare")
    def compare_cmd(
        runs: List[Path] = typer.Argument(
            ...,
            help="Runs: evaluate output dirs, or checkpoint/run dirs (then --data is needed). The first is the reference.",
        ),
        out: Path = typer.Option(Path("compare"), "--out"),
        data: Optional[Path] = typer.Option(
            None, "--data", help="Manifest to evaluate checkpoint runs on."
        ),
        split: str = typer.Option("test", "--split"),
        bootstrap: int = typer.Option(1000, "--bootstrap"),
        seed: int = typer.Option(0, "--seed"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir"),
        device: str = typer.Option("cpu", "--device"),
    ) -> None:
        """Paper-style table of several runs + paired bootstrap Δ macro AUC vs the first."""
        from molre.evaluate import compare_runs

        compare_runs(
            runs,
            out,
            data=data,
            split=split,
            n_boot=bootstrap,
            seed=seed,
            cache_dir=cache_dir,
            device=device,
        )
        typer.echo((Path(out) / "compare.md").read_text(encoding="utf-8"))

    @app.command("infer")
    def infer_cmd(
        series: Path = typer.Argument(..., help="Series directory (DICOM files) or NIfTI file."),
        checkpoint: Optional[Path] = typer.Option(
            None,
            "--checkpoint",
            help="Checkpoint dir or run dir; 'demo' (the default) = the packaged demo.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        device: str = typer.Option("cpu", "--device"),
        weights: Optional[str] = typer.Option(
            None,
            "--weights",
            help="Backbone weights if not found from the card (file, folder or hf://repo in an offline cache, as for train).",
        ),
    ) -> None:
        """Probabilities and decisions per finding for one series on disk."""
        from molre.checkpoint import Predictor

        pred = Predictor.from_checkpoint(checkpoint, device=device, weights=weights)
        res = pred.predict_series(series)
        if as_json:
            typer.echo(json.dumps(res.to_dict(), indent=2))
            return
        if res.is_demo:
            typer.echo(f"!! {pred.card.get('disclaimer', 'DEMO MODEL - not for clinical use')}")
        typer.echo(
            f"model {res.model_name} {res.model_version}  checkpoint {res.checkpoint_hash[:16]}  "
            f"instances {len(res.used_sop_instance_uids)}"
        )
        w = max(len(k) for k in res.probabilities)
        for k, p in sorted(res.probabilities.items(), key=lambda kv: -kv[1]):
            flag = "POSITIVE" if res.decisions[k] else ""
            typer.echo(f"  {k:<{w}}  {p:6.3f}  (thr {res.thresholds.get(k, 0.5):.3f})  {flag}")
        if res.not_assessed:
            typer.echo(
                f"  not assessed (no validation evidence in this checkpoint): "
                f"{len(res.not_assessed)} catalog finding(s)"
            )
        for warn in res.warnings:
            typer.echo(f"  warning: {warn}")
