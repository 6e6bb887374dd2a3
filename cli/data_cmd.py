"""CLI commands: synth.

`molre-node synth` writes synthetic head-CT phantoms as real CT DICOM plus a training manifest,
so the trainer, the node and the tests can run end to end without clinical data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("synth")
    def synth_cmd(
        out: Path = typer.Option(
            ...,
            "--out",
            help="Output folder (must be empty unless --overwrite): series_NNNN/ folders, manifest.csv, phantoms.jsonl.",
        ),
        count: int = typer.Option(..., "--count", help="Number of series to write."),
        seed: int = typer.Option(
            0, "--seed", help="Random seed; the same seed gives the same labels and pixels."
        ),
        size: Optional[int] = typer.Option(
            None,
            "--size",
            help="Matrix size (rows = columns), 32..512 (default: each site's own matrix).",
        ),
        slices: Optional[int] = typer.Option(
            None,
            "--slices",
            help="Slices per series (default: skull base to vertex for the slice thickness).",
        ),
        thickness: Optional[float] = typer.Option(
            None, "--thickness", help="Slice thickness in mm (default: the site's protocol)."
        ),
        sites: Optional[str] = typer.Option(
            None,
            "--sites",
            help="Comma-separated built-in sites to draw from per series (default: all; see docs/synthetic-data.md).",
        ),
        findings: Optional[str] = typer.Option(
            None,
            "--findings",
            help="Plant exactly these findings (comma-separated catalog keys) in every series, instead of drawing them.",
        ),
        normal: bool = typer.Option(
            False, "--normal", help="Plant no finding at all (every series normal)."
        ),
        no_masks: bool = typer.Option(
            False,
            "--no-masks",
            help="Do not write masks/series_NNNN.npz (the planted findings' voxel masks).",
        ),
        prevalence: float = typer.Option(
            0.3, "--prevalence", help="Rate of each plantable finding across the dataset (0..1)."
        ),
        normal_fraction: float = typer.Option(
            0.25, "--normal-fraction", help="Share of scans with no finding at all."
        ),
        unlabelled: float = typer.Option(
            0.0,
            "--unlabelled",
            help="Share of series written without labels (blank manifest cells).",
        ),
        workers: int = typer.Option(
            1, "--workers", help="Worker processes (the output does not depend on it)."
        ),
        overwrite: bool = typer.Option(
            False,
            "--overwrite",
            help="Replace phantoms (series_*/, manifest.csv, phantoms.jsonl) in a non-empty --out.",
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Write synthetic head-CT phantoms with planted findings, and their manifest."""
        from common.errors import MolreError
        from molre.data.synth import dataset_summary, generate_dataset

        if normal and findings:
            raise MolreError("synth: --normal and --findings contradict each other; give one")
        planted = (
            []
            if normal
            else (
                None if findings is None else [f.strip() for f in findings.split(",") if f.strip()]
            )
        )
        site_list = None if sites is None else [x for x in sites.split(",") if x.strip()]

        manifest = generate_dataset(
            out,
            count,
            seed,
            size,
            prevalence=prevalence,
            normal_fraction=normal_fraction,
            unlabelled_fraction=unlabelled,
            workers=max(1, workers),
            n_slices=slices,
            slice_thickness=thickness,
            overwrite=overwrite,
            progress=not no_progress,
            sites=site_list,
            findings=planted,
            masks=not no_masks,
        )
        s = dataset_summary(out)
        splits = ", ".join(f"{k} {v}" for k, v in sorted(s["splits"].items()))
        typer.echo(f"wrote {s['series']} series ({s['files']} DICOM files) to {Path(out)}")
        typer.echo(f"manifest: {manifest}")
        typer.echo(f"splits: {splits}; normal: {s['normal']}; unlabelled: {s['unlabelled']}")
        typer.echo("sites: " + ", ".join(f"{k} {v}" for k, v in sorted(s["sites"].items())))
        width = max(len(k) for k in s["findings"])
        for key, n in s["findings"].items():
            typer.echo(f"  {key:<{width}}  {n}")
