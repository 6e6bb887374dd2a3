"""CLI commands: synth (issue 4).

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
        out: Path = typer.Option(..., "--out", help="Output folder (must be empty unless --overwrite): series_NNNN/ folders, manifest.csv, phantoms.jsonl."),
        count: int = typer.Option(..., "--count", help="Number of series to write."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same labels and pixels."),
        size: int = typer.Option(128, "--size", help="Matrix size (rows = columns), 32..512."),
        slices: Optional[int] = typer.Option(None, "--slices", help="Slices per series (default: skull base to vertex for the slice thickness)."),
        thickness: Optional[float] = typer.Option(None, "--thickness", help="Slice thickness in mm (default: random 2.5 / 3 / 4 / 5 mm per series)."),
        prevalence: float = typer.Option(0.3, "--prevalence", help="Rate of each plantable finding across the dataset (0..1)."),
        normal_fraction: float = typer.Option(0.25, "--normal-fraction", help="Share of scans with no finding at all."),
        unlabelled: float = typer.Option(0.0, "--unlabelled", help="Share of series written without labels (blank manifest cells)."),
        workers: int = typer.Option(1, "--workers", help="Worker processes (the output does not depend on it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace phantoms (series_*/, manifest.csv, phantoms.jsonl) in a non-empty --out."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Write synthetic head-CT phantoms with planted findings, and their manifest."""
        from molre.data.synth import dataset_summary, generate_dataset

        manifest = generate_dataset(out, count, seed, size, prevalence=prevalence,
                                    normal_fraction=normal_fraction, unlabelled_fraction=unlabelled,
                                    workers=max(1, workers), n_slices=slices,
                                    slice_thickness=thickness, overwrite=overwrite,
                                    progress=not no_progress)
        s = dataset_summary(out)
        splits = ", ".join(f"{k} {v}" for k, v in sorted(s["splits"].items()))
        typer.echo(f"wrote {s['series']} series ({s['files']} DICOM files) to {Path(out)}")
        typer.echo(f"manifest: {manifest}")
        typer.echo(f"splits: {splits}; normal: {s['normal']}; unlabelled: {s['unlabelled']}")
        width = max(len(k) for k in s["findings"])
        for key, n in s["findings"].items():
            typer.echo(f"  {key:<{width}}  {n}")
