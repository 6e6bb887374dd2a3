"""CLI: `molre-node labels` (reports -> LABELS.csv) and `labels-score` (labeler vs its corpus).

Thin: options are parsed here, the work is in `molre.labels` (docs/report-labels.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("labels")
    def labels_cmd(
        reports: Path = typer.Argument(
            ...,
            help="Reports: a CSV with columns accession_number,report_text, or a folder of <accession>.txt files.",
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            help="LABELS.csv to write (accession_number + one column per finding: 1 / 0 / -1 / empty); the evidence goes to LABELS.evidence.jsonl and the run info to LABELS.json beside it.",
        ),
        uncertain: str = typer.Option(
            "keep",
            "--uncertain",
            help="Uncertain mentions: keep (-1, decide later in `dataset pull`), positive (1), negative (0) or blank (not labelled). Recorded in LABELS.json.",
        ),
        lexicon: Optional[Path] = typer.Option(
            None, "--lexicon", help="Site lexicon JSON (default: the packaged head-CT lexicon)."
        ),
        catalog: Optional[Path] = typer.Option(
            None,
            "--catalog",
            help="Site finding catalog (.json/.csv); default = packaged 75 findings.",
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Label head-CT reports per catalog finding (medspaCy: ConText + sections)."""
        from common.log import get_logger
        from molre.catalog import load_catalog
        from molre.labels import label_reports, load_lexicon, read_reports

        cat = load_catalog(catalog)
        lex = load_lexicon(cat, lexicon)
        texts = read_reports(reports)
        bar = None
        if not no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="report", desc="labels", leave=False)
        try:
            info = label_reports(
                texts,
                out,
                cat,
                lex,
                uncertain=uncertain,
                progress=(lambda n: bar.update(1)) if bar is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()
        get_logger("labels").info(
            "reports labelled",
            reports=info["reports"],
            uncertain_policy=uncertain,
            **{f"labels_{k}": v for k, v in info["labels"].items()},
        )
        typer.echo(
            f"{info['reports']} reports -> {out} (positive {info['labels']['1']}, negative "
            f"{info['labels']['0']}, uncertain {info['labels']['-1']}); evidence: "
            f"{info['evidence']}"
        )

    @app.command("labels-score")
    def labels_score_cmd(
        corpus: Optional[Path] = typer.Argument(
            None,
            help="Corpus CSV (accession_number,report_text,expected); default: the packaged corpus.",
        ),
        lexicon: Optional[Path] = typer.Option(None, "--lexicon", help="Site lexicon JSON."),
        catalog: Optional[Path] = typer.Option(None, "--catalog", help="Site finding catalog."),
        markdown: bool = typer.Option(
            False,
            "--markdown",
            help="Print the per-finding table as Markdown (for docs/report-labels.md).",
        ),
        errors: bool = typer.Option(
            False, "--errors", help="Also list every disagreement (quotes the corpus text)."
        ),
    ) -> None:
        """Measure the labeler's per-finding precision/recall on a corpus with expected labels."""
        from molre.catalog import load_catalog
        from molre.labels import ReportLabeler, load_lexicon
        from molre.labels.score import default_corpus_path, read_corpus, score_corpus, to_markdown

        cat = load_catalog(catalog)
        lex = load_lexicon(cat, lexicon)
        items = read_corpus(corpus or default_corpus_path(), cat, lex)
        score = score_corpus(items, ReportLabeler(lex, cat))
        if markdown:
            typer.echo(to_markdown(score, cat), nl=False)
        else:
            typer.echo(
                json.dumps(
                    {"items": score.items, "overall": score.overall, "per_class": score.per_class},
                    indent=1,
                )
            )
        if errors:
            for e in score.errors:
                typer.echo(
                    f"{e['accession_number']} {e['finding']}: expected {e['expected']}, "
                    f"got {e['got']} | {e['text']}"
                )
