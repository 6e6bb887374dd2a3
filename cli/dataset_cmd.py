"""CLI: `molre-node dataset pull` -- a training set from the PACS.

Thin: options are parsed here, the work is in `node.pull` (docs/training.md, "From your PACS to
your own adapters").
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

dataset_app = typer.Typer(help="Build training data sets from a PACS.", no_args_is_help=True)


@dataset_app.command("pull")
def pull_cmd(
    labels: Path = typer.Argument(
        ..., help="LABELS.csv from `molre-node labels` (accession_number + finding columns)."
    ),
    pacs: str = typer.Option(
        ...,
        "--pacs",
        help="The PACS to query and retrieve from (Study Root C-FIND / C-GET): AET@host:port.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Data set folder: series/, manifest.csv, series.csv, skipped.csv, dataset.json.",
    ),
    calling_ae: str = typer.Option(
        "MOLRE", "--calling-ae", help="Our AE title (the PACS must know it)."
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="Node config TOML whose [selection] rules choose the series (default: the built-in rules, as `serve` uses them).",
    ),
    uncertain: str = typer.Option(
        "blank",
        "--uncertain",
        help="Uncertain (-1) labels in the manifest: blank (not labelled, masked from the loss), positive or negative. Recorded in dataset.json.",
    ),
    split: str = typer.Option("70,15,15", "--split", help="train,val,test fractions by patient."),
    pseudonymise: bool = typer.Option(
        True,
        "--pseudonymise/--keep-ids",
        help="Keyed-hash patient IDs in the manifest (key in OUT/.pseudonym-key).",
    ),
    site: Optional[str] = typer.Option(
        None,
        "--site",
        help="Value of the manifest's site column (default: Manufacturer + ManufacturerModelName of each series).",
    ),
    workers: int = typer.Option(
        2, "--workers", help="Accessions fetched at once (one association each)."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="DICOM network timeout in seconds."),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Only the first N accessions (trying things out)."
    ),
    catalog: Optional[Path] = typer.Option(
        None, "--catalog", help="Site finding catalog (.json/.csv); default = packaged 75 findings."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Query the PACS for each accession, choose the series with the node's selection rules,
    retrieve it, and write a manifest for `molre-node train`. A re-run fetches only what is
    missing."""
    from molre.catalog import load_catalog
    from node.config import SelectionConfig, load_config
    from node.pull import Pacs, PullOptions, parse_split, pull_dataset

    rules = load_config(config).selection if config is not None else SelectionConfig()
    opts = PullOptions(
        out=out,
        calling_ae=calling_ae,
        workers=workers,
        uncertain=uncertain,
        split=parse_split(split),
        pseudonymise=pseudonymise,
        site=site,
        timeout_s=timeout,
        limit=limit,
    )
    bar = None
    if not no_progress:
        from tqdm import tqdm

        bar = tqdm(unit="accession", desc="pull", leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        s = pull_dataset(
            labels, Pacs.parse(pacs), opts, load_catalog(catalog), rules, progress=progress
        )
    finally:
        if bar is not None:
            bar.close()
    skipped = ", ".join(f"{k} {v}" for k, v in s.skipped.items()) or "none"
    typer.echo(
        f"{s.rows} series in {s.manifest} (fetched {s.fetched}, already there "
        f"{s.reused}; splits {s.splits}); skipped: {skipped} (see "
        f"{out / 'skipped.csv'})"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
