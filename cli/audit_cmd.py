"""CLI commands: `molre-node audit …` — read the audit database, prune old data.

Thin on purpose: options are parsed here, the queries live in `storage.queries`, so the same
answers are available to Python users and to `sqlite3` users (docs/audit.md).
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import enum
import io
import json
import re
from pathlib import Path
from typing import Any

import typer

from common.errors import MolreError
from common.jsonsafe import jsonable

audit_app = typer.Typer(
    name="audit",
    help="Query the audit database (studies, series, timelines, events, findings, exports, "
    "stats) and "
    "prune old data.",
    no_args_is_help=True,
)


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"


DbOpt = typer.Option(None, "--db", help="Database URL or SQLite file (overrides --config).")
ConfigOpt = typer.Option(
    None,
    "--config",
    "-c",
    help="Node config TOML (its database is used).",
    exists=False,
    dir_okay=False,
)
FormatOpt = typer.Option(
    Format.table, "--format", "-f", help="Output format.", case_sensitive=False
)


# -- helpers ----------------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str = "--older-than") -> dt.timedelta:
    """'30d', '12h', '90m', '2w', '45s' -> timedelta."""
    m = _DURATION.match(text or "")
    if not m:
        raise MolreError(f"{option} {text!r}: use a number and a unit s/m/h/d/w, e.g. 30d or 12h")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_since(text: str | None) -> dt.datetime | None:
    """ISO date/datetime (UTC unless it says otherwise) or a duration ago ('7d')."""
    if text is None:
        return None
    if _DURATION.match(text):
        return dt.datetime.now(dt.timezone.utc) - parse_duration(text, "--since")
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise MolreError(
            f"--since {text!r}: use a date (2026-01-31), a date-time "
            "(2026-01-31T08:00) or a duration ago (7d)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _open(db: str | None, config: Path | None):
    """Resolve the database (``--db`` > ``--config`` > node default), migrate it, return a Store.

    Returns (store, node_config_or_None). A missing SQLite file is an error rather than
    silently creating an empty database at a mistyped path.
    """
    from sqlalchemy.engine import make_url

    from storage import Database, Store
    from storage.db import normalise_url

    cfg = None
    if db is None or config is not None:
        from node.config import load_config

        cfg = load_config(config)
    if db is not None:
        url = normalise_url(db)
    elif cfg is not None:  # no --db: the config's (or the default) database
        url = normalise_url(cfg.database_url)
    else:
        raise AssertionError("unreachable: no --db loads the config")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).expanduser().is_file():
            where = (
                "--db"
                if db is not None
                else (
                    f"{config} (storage.data_dir / database_url)"
                    if config
                    else "the default data dir"
                )
            )
            raise MolreError(
                f"no audit database at {parsed.database} (from {where}); start the "
                "node first, or pass --db URL / --config FILE"
            )
    database = Database(url)
    database.upgrade()
    store_phi = bool(cfg.audit.store_phi) if cfg is not None else False
    return Store(database, store_phi=store_phi), cfg


def _cell(value: Any) -> str:
    value = jsonable(value)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render(
    rows: list[dict[str, Any]], fmt: Format, *, payload: Any = None, max_width: int = 64
) -> str:
    """Rows as an aligned text table, a JSON array (or ``payload``), or CSV with a header."""
    if fmt is Format.json:
        return json.dumps(jsonable(payload if payload is not None else rows), indent=2)
    if fmt is Format.csv:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
        return buf.getvalue().rstrip("\n")
    if not rows:
        return "(none)"
    cols = list(rows[0])
    cells = [[_clip(_cell(r.get(c)), max_width) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _echo(rows: list[dict[str, Any]], fmt: Format, payload: Any = None) -> None:
    typer.echo(render(rows, fmt, payload=payload))


# -- commands ---------------------------------------------------------------------------------
@audit_app.command("studies")
def studies_cmd(
    since: str | None = typer.Option(None, "--since", help="First seen at/after: date or '7d'."),
    accession: str | None = typer.Option(None, "--accession", help="Only this accession number."),
    limit: int = typer.Option(100, "--limit", help="At most this many rows (0 = all)."),
    phi: bool = typer.Option(
        False,
        "--phi",
        help="Show patient columns (only filled when the node runs with audit.store_phi = true).",
    ),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Studies seen by the node, newest first, with the states of their series."""
    store, _ = _open(db, config)
    _echo(
        store.studies(
            since=parse_since(since), accession=accession, limit=limit or None, include_phi=phi
        ),
        fmt,
    )


@audit_app.command("series")
def series_cmd(
    state: str | None = typer.Option(
        None,
        "--state",
        help="receiving, complete, selected, "
        "skipped, queued, inferring, reported, delivered, failed.",
    ),
    study: str | None = typer.Option(None, "--study", help="Only series of this Study UID."),
    since: str | None = typer.Option(None, "--since", help="Last instance at/after: date or '7d'."),
    limit: int = typer.Option(100, "--limit", help="At most this many rows (0 = all)."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Series and where they are in the pipeline (state, version, reason)."""
    from storage import SeriesState

    if state is not None and state not in {s.value for s in SeriesState}:
        raise MolreError(f"--state {state!r}: use one of {', '.join(s.value for s in SeriesState)}")
    store, _ = _open(db, config)
    _echo(
        store.series(state=state, study_uid=study, since=parse_since(since), limit=limit or None),
        fmt,
    )


@audit_app.command("show")
def show_cmd(
    uid: str = typer.Argument(..., help="Study Instance UID, Series Instance UID or accession."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """The full timeline of a study or series: every event, oldest first."""
    from storage import NotFound

    store, _ = _open(db, config)
    try:
        rows = store.timeline(uid)
    except NotFound as exc:
        raise MolreError(f"{exc}; list what is there with `molre-node audit studies`") from None
    _echo(rows, fmt)


@audit_app.command("events")
def events_cmd(
    entity: str | None = typer.Option(
        None, "--entity", help="node, association, series, job, export, notification, instance."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="Event kind, e.g. rejected, process_died, recovered, reclaimed."
    ),
    since: str | None = typer.Option(None, "--since", help="At/after: date or '7d'."),
    limit: int = typer.Option(100, "--limit", help="At most this many rows (0 = all)."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Audit events across the node, newest first: the ones that belong to no study
    (start-up recovery, receiver processes, refused associations) and any other, filtered."""
    store, _ = _open(db, config)
    _echo(
        store.events(entity=entity, kind=kind, since=parse_since(since), limit=limit or None),
        fmt,
    )


@audit_app.command("findings")
def findings_cmd(
    finding: str | None = typer.Option(
        None,
        "--finding",
        help="Finding key, e.g. "
        "subdural_hemorrhage (the packaged catalog's keys are in "
        "docs/catalog.md; an unknown key lists the valid ones).",
    ),
    min_prob: float | None = typer.Option(
        None, "--min-prob", help="Only probabilities >= P (0..1)."
    ),
    since: str | None = typer.Option(None, "--since", help="Reported at/after: date or '7d'."),
    positive: bool = typer.Option(False, "--positive", help="Only positive decisions."),
    limit: int = typer.Option(0, "--limit", help="At most this many rows (0 = all)."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Per-finding results (probability and decision) of reported series, newest first."""
    if min_prob is not None and not 0.0 <= min_prob <= 1.0:
        raise MolreError(f"--min-prob {min_prob}: a probability between 0 and 1")
    store, _ = _open(db, config)
    if finding is not None:
        _check_finding_key(store, finding)
    rows = store.findings(
        key=finding,
        min_prob=min_prob,
        since=parse_since(since),
        positive_only=positive,
        limit=limit or None,
    )
    if fmt is not Format.json:  # the table and CSV say what the SR says; JSON keeps the boolean
        rows = [r | {"decision": "Present" if r.get("decision") else "Absent"} for r in rows]
    _echo(rows, fmt)


def _check_finding_key(store: Any, key: str) -> None:
    """An unknown --finding would silently match nothing: name the valid keys instead (those
    of the packaged catalog and those recorded in this database)."""
    from molre.catalog import load_catalog

    known = set(load_catalog().keys)
    if key in known:
        return
    from sqlalchemy import select

    from storage.models import Result

    with store.db.session(write=False) as s:
        recorded = set(s.scalars(select(Result.finding_key).distinct()))
    if key in recorded:
        return
    valid = sorted(known | recorded)
    close = [k for k in valid if key.lower() in k][:5] or difflib.get_close_matches(
        key.lower(), valid, n=3
    )
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise MolreError(
        f"--finding {key!r} is not a finding key.{hint} Valid keys: {', '.join(valid)}"
    )


@audit_app.command("exports")
def exports_cmd(
    pending: bool = typer.Option(False, "--pending", help="Only not yet delivered."),
    failed: bool = typer.Option(
        False,
        "--failed",
        help="Only not delivered whose last attempt failed (still being retried).",
    ),
    limit: int = typer.Option(0, "--limit", help="At most this many rows (0 = all)."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """The outbox: reports and their delivery to each destination."""
    store, _ = _open(db, config)
    _echo(store.exports(pending=pending, failed=failed, limit=limit or None), fmt)


@audit_app.command("notifications")
def notifications_cmd(
    pending: bool = typer.Option(False, "--pending", help="Only not yet delivered."),
    limit: int = typer.Option(0, "--limit", help="At most this many rows (0 = all)."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Critical-finding notifications and their delivery state (pending, delivered,
    rejected), attempts and last error."""
    store, _ = _open(db, config)
    _echo(store.notifications(pending=pending, limit=limit or None), fmt)


@audit_app.command("agreement")
def agreement_cmd(
    shadow: str | None = typer.Option(
        None, "--shadow", help="Only this shadow model ([[model.shadow]] name)."
    ),
    by: str = typer.Option(
        "finding", "--by", help="finding (default), site (manufacturer + model) or manufacturer."
    ),
    show_disagreements: bool = typer.Option(
        False, "--disagreements", help="List the cases where primary and shadow decisions differ."
    ),
    since: str | None = typer.Option(None, "--since", help="Results at/after: date or '7d'."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Shadow mode: primary vs shadow model per finding -- agreement, Cohen's kappa,
    positives of each side; --by site/manufacturer; --disagreements lists the cases."""
    from storage import agreement as ag

    if by not in ag.GROUPINGS:
        raise MolreError(f"--by {by!r}: use one of {', '.join(ag.GROUPINGS)}")
    store, _ = _open(db, config)
    with store.db.session(write=False) as s:
        if show_disagreements:
            rows = ag.disagreements(s, shadow=shadow, since=parse_since(since))
        else:
            rows = ag.agreement(s, shadow=shadow, by=by, since=parse_since(since))
    if not rows and fmt is Format.table:
        typer.echo("(no shadow results paired with primary results; configure [[model.shadow]])")
        return
    _echo(rows, fmt)


def _flatten(prefix: str, value: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append({"metric": prefix, "value": value})


@audit_app.command("stats")
def stats_cmd(
    db: str | None = DbOpt, config: Path | None = ConfigOpt, fmt: Format = FormatOpt
) -> None:
    """Counts per state and latency percentiles (received -> reported -> delivered)."""
    store, _ = _open(db, config)
    data = store.stats()
    rows: list[dict[str, Any]] = []
    _flatten("", data, rows)
    _echo(rows, fmt, payload=data)


@audit_app.command("prune")
def prune_cmd(
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        help="Retention, e.g. 30d (default: audit.retention_days of the config).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be removed."),
    spool_dir: Path | None = typer.Option(
        None, "--spool", help="Spool folder (default: the config's <data_dir>/spool)."
    ),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
    fmt: Format = FormatOpt,
) -> None:
    """Remove rows and spool/report files past the retention; pending work is never touched."""
    from storage import Spool

    store, cfg = _open(db, config)
    if older_than is None:
        days = cfg.audit.retention_days if cfg is not None else 0
        if not days:
            raise MolreError(
                "prune needs --older-than (e.g. 30d) or audit.retention_days > 0 in the config"
            )
        retention = dt.timedelta(days=days)
    else:
        retention = parse_duration(older_than)
    root = spool_dir if spool_dir is not None else (cfg.spool_dir if cfg is not None else None)
    spool = Spool(root) if root is not None and Path(root).is_dir() else None
    report = store.prune(retention, dry_run=dry_run, spool=spool)
    data = report.to_dict()
    verb = "would remove" if dry_run else "removed"
    if fmt is Format.table:
        typer.echo(
            f"{verb} (cutoff {report.cutoff.isoformat()}): {len(report.series)} series, "
            f"{len(report.studies)} studies, {report.instances} instances, "
            f"{report.jobs} jobs, {report.results} results, {report.exports} exports, "
            f"{report.events} events, {report.associations} associations, "
            f"{len(report.files)} files ({report.bytes} bytes of spool)"
        )
        for uid in report.series:
            typer.echo(f"  series {uid}")
        for path in report.files:
            typer.echo(f"  file {path}")
        return
    rows = [{"kind": "series", "item": u} for u in report.series]
    rows += [{"kind": "study", "item": u} for u in report.studies]
    rows += [{"kind": "file", "item": p} for p in report.files]
    _echo(rows, fmt, payload=data)


@audit_app.command("retry")
def retry_cmd(
    series_uid: str = typer.Argument(..., help="Series Instance UID of a failed series."),
    db: str | None = DbOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Re-queue a failed series: a new inference job (attempts from 0), audited as an operator
    retry. The running nodes' workers pick it up; nothing else changes."""
    from storage import InvalidTransition, NotFound

    store, _ = _open(db, config)
    try:
        job_id = store.retry_series(series_uid, by="operator (molre-node audit retry)")
    except (InvalidTransition, NotFound) as exc:
        raise MolreError(str(exc)) from None
    typer.echo(f"series {series_uid}: queued again as job {job_id}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(audit_app, name="audit")
