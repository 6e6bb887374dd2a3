"""The read-only web dashboard: what the node is doing, at a glance, without a terminal.

Why inside the node: the operator's first questions (is it receiving? is the queue moving? are
reports reaching the PACS? did the positive rate of a finding jump at one site?) are answered by
the audit database plus the live state of the workers, which only the running node knows.

Served by :class:`Dashboard` (stdlib ``http.server``, one thread per request) on
``dashboard.host:dashboard.port`` (loopback by default; port 0 = off). Pages:

- ``/`` server-rendered HTML (no scripts, refreshes itself every 15 s),
- ``/api/status`` the same content as JSON, ``/healthz`` (no auth) ``ok``, ``/readyz`` (no
  auth) 200 ``ready`` once every inference process has loaded the checkpoint, 503
  ``not ready: inference loading`` before (``node.inference`` in the status says the same).

Access: ``dashboard.token`` (``Authorization: Bearer T`` or ``?token=T``) and/or
``dashboard.username`` + ``password`` (HTTP basic); a non-loopback host needs one of them
(config validation). Nothing is writable. No PHI: UIDs, states, reasons and counts; accession
numbers only when ``audit.store_phi`` is on. Secrets in the configuration summary are masked.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import html
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.log import get_logger
from node.config import NodeConfig
from node.interfaces import DashboardStore

log = get_logger("node.dashboard")

#: Days of results behind the positive-rate tables.
RATE_DAYS = 14
RECENT_SERIES = 50


def _iso(v: Any) -> Any:
    return v.isoformat(timespec="seconds") if isinstance(v, dt.datetime) else v


def _site(meta: dict[str, Any] | None) -> str:
    meta = meta or {}
    parts = [str(meta.get(k) or "").strip() for k in ("Manufacturer", "ManufacturerModelName")]
    return " ".join(p for p in parts if p) or "unknown"


def collect(
    store: DashboardStore, config: NodeConfig, service: Any = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Everything the dashboard shows, as one JSON-able dict (read-only queries)."""
    from sqlalchemy import func, select

    from storage.models import Export, Job, Notification, Result, Series, ShadowResult, Study

    now = now or store.now()
    stats = store.stats()
    phi = bool(config.audit.store_phi)
    out: dict[str, Any] = {
        "generated_at": _iso(now),
        "node": {
            "name": config.node_name,
            "roles": list(config.node.roles),
            "ae_title": config.network.ae_title,
            "host": config.network.host,
            "port": getattr(service, "port", None) or config.network.port,
            "checkpoint": config.model.checkpoint or "packaged demo checkpoint",
            "shadow_models": [s.name for s in config.model.shadow],
            "store_phi": phi,
        },
    }
    workers = []
    pool = getattr(service, "workers", None)
    for w in getattr(pool, "workers", []) or []:
        info = getattr(w.engine, "info", None) or {}
        workers.append(
            {
                "id": w.worker_id,
                "busy": bool(w.busy),
                "alive": bool(w._thread is not None and w._thread.is_alive()),
                "inference": getattr(w, "engine_state", None),
                "engine_pid": getattr(w.engine, "pid", None),
                "model": info.get("model_name"),
                "checkpoint_hash": (info.get("checkpoint_hash") or "")[:16] or None,
                "shadows": [s.name for s, _ in getattr(w, "shadows", [])],
            }
        )
    out["queue"] = {"series": stats["series"], "jobs": stats["jobs"], "workers": workers}
    out["node"]["inference"] = inference_status(service)
    out["latency"] = stats["latency"]
    with store.db.session(write=False) as s:
        # recent series with their state, skip/failure reason and last job error
        rows = s.execute(
            select(Series, Study.accession_number)
            .join(Study, Study.study_uid == Series.study_uid)
            .order_by(Series.updated_at.desc(), Series.id.desc())
            .limit(RECENT_SERIES)
        ).all()
        uids = [r.series_uid for r, _ in rows]
        errors: dict[str, str] = {}
        if uids:
            for uid, err in s.execute(
                select(Job.series_uid, Job.error)
                .where(Job.series_uid.in_(uids), Job.error.is_not(None))
                .order_by(Job.id)
            ):
                if err is not None:  # excluded by the query; narrows the type
                    errors[uid] = err
        out["series"] = [
            {
                "series_uid": r.series_uid,
                "study_uid": r.study_uid,
                "state": r.state,
                "version": r.version,
                "instances": r.instance_count,
                "modality": r.modality,
                "reason": r.reason or (errors.get(r.series_uid) if r.state == "failed" else None),
                "last_job_error": errors.get(r.series_uid),
                "site": _site(r.meta),
                "updated_at": _iso(r.updated_at),
                **({"accession_number": acc} if phi else {}),
            }
            for r, acc in rows
        ]
        # deliveries per destination (aggregated in SQL: the outbox keeps its whole history)
        dests: dict[str, dict[str, Any]] = {}
        for name, state, count, attempts, oldest in s.execute(
            select(
                Export.destination,
                Export.state,
                func.count(),
                func.sum(Export.attempts),
                func.min(Export.created_at),
            ).group_by(Export.destination, Export.state)
        ):
            d = dests.setdefault(
                name,
                {
                    "destination": name,
                    "pending": 0,
                    "delivered": 0,
                    "attempts": 0,
                    "retries": 0,
                    "last_error": None,
                    "oldest_pending": None,
                },
            )
            d[state] = count
            d["attempts"] += int(attempts or 0)
            d["retries"] += max(0, int(attempts or 0) - count)
            if state == "pending":
                d["oldest_pending"] = _iso(oldest)
                d["last_error"] = s.execute(
                    select(Export.last_error)
                    .where(
                        Export.destination == name,
                        Export.state == "pending",
                        Export.last_error.is_not(None),
                    )
                    .order_by(Export.id.desc())
                    .limit(1)
                ).scalar()
        out["deliveries"] = sorted(dests.values(), key=lambda x: x["destination"])
        chans: dict[str, dict[str, Any]] = {}
        for name, kind, state, count, attempts in s.execute(
            select(
                Notification.channel,
                Notification.kind,
                Notification.state,
                func.count(),
                func.sum(Notification.attempts),
            ).group_by(Notification.channel, Notification.kind, Notification.state)
        ):
            c = chans.setdefault(
                name,
                {
                    "channel": name,
                    "kind": kind,
                    "pending": 0,
                    "delivered": 0,
                    "rejected": 0,
                    "attempts": 0,
                    "last_error": None,
                },
            )
            c[state] = count
            c["attempts"] += int(attempts or 0)
            if state != "delivered" and c["last_error"] is None:
                c["last_error"] = s.execute(
                    select(Notification.last_error)
                    .where(
                        Notification.channel == name,
                        Notification.state != "delivered",
                        Notification.last_error.is_not(None),
                    )
                    .order_by(Notification.id.desc())
                    .limit(1)
                ).scalar()
        out["notifications"] = sorted(chans.values(), key=lambda x: x["channel"])
        # positive rate per finding per day and per site/scanner (drift at a glance)
        since = now - dt.timedelta(days=RATE_DAYS)
        by_day: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        by_site: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for key, decision, at, meta in s.execute(
            select(Result.finding_key, Result.decision, Result.created_at, Series.meta)
            .join(Series, Series.series_uid == Result.series_uid)
            .where(Result.created_at >= since)
        ):
            day = at.date().isoformat()
            for bucket in (by_day[(key, day)], by_site[(_site(meta), key)]):
                bucket[0] += 1
                bucket[1] += int(bool(decision))
        out["positive_rate"] = {
            "days": RATE_DAYS,
            "by_day": [
                {"finding": k, "day": d, "n": n, "positives": p, "rate": round(p / n, 4)}
                for (k, d), (n, p) in sorted(by_day.items())
            ],
            "by_site": [
                {"site": site, "finding": k, "n": n, "positives": p, "rate": round(p / n, 4)}
                for (site, k), (n, p) in sorted(by_site.items())
            ],
        }
        from storage.agreement import agreement

        out["shadow"] = {
            "recorded": [
                {"model": m, "findings": n}
                for m, n in s.execute(
                    select(ShadowResult.model_name, func.count()).group_by(ShadowResult.model_name)
                )
            ],
            "agreement": agreement(s, since=since),
        }
    out["config"] = _config_summary(config)
    return out


def _config_summary(config: NodeConfig) -> dict[str, Any]:
    d = config.public_dict()
    keep = (
        "node",
        "network",
        "model",
        "destinations",
        "retry",
        "audit",
        "dashboard",
        "notifications",
        "selection",
        "assembler",
        "storage",
        "report",
    )
    summary = {k: d[k] for k in keep if k in d}
    summary["network"] = {k: v for k, v in summary["network"].items() if k != "allowed_callers"} | {
        "allowed_callers": len(config.network.allowed_callers)
    }
    return summary


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _inference_text(st: dict[str, Any]) -> str:
    state = st.get("state")
    if state == "ready":
        return "ready"
    if state == "none":
        return "none on this node (no worker role)"
    if state == "unavailable":
        return f"NOT READY: checkpoint load failed ({st.get('error') or 'see the log'}); retrying"
    return f"NOT READY: loading the checkpoint for {st.get('for_s', 0):.0f} s"


def _table(title: str, rows: list[dict[str, Any]], cols: list[str], ident: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = (
        "".join("<tr>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
        or f"<tr><td colspan='{len(cols)}'>none</td></tr>"
    )
    return (
        f"<section id='{ident}'><h2>{_e(title)}</h2><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


def inference_status(service: Any) -> dict[str, Any]:
    """Whether this node can read a series now: "ready", "loading" (an inference process is
    still loading the checkpoint; completed series wait in the queue), "unavailable" (a load
    failed and is retried), or "none" (no worker role here)."""
    pool = getattr(service, "workers", None)
    if pool is None or not getattr(pool, "workers", None):
        return {"ready": True, "state": "none"}
    return pool.inference_status()


def render_html(data: dict[str, Any]) -> str:
    node = data["node"]
    q = data["queue"]
    counts = [{"what": "series", **q["series"]}, {"what": "jobs", **q["jobs"]}]
    count_cols = ["what"] + sorted({k for c in counts for k in c if k != "what"})
    lat = [{"interval": k, **v} for k, v in data["latency"].items()]
    cfg = json.dumps(data["config"], indent=1, default=str)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='15'>",
        f"<title>molre-node {_e(node['name'])}</title><style>",
        "body{font:13px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}"
        "table{border-collapse:collapse;margin:.3em 0 1em}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:left}th{background:#eee}h1{font-size:20px}"
        "h2{font-size:15px;margin:1em 0 .2em}.failed,.skipped{color:#a00}pre{background:#f6f6f6;"
        "padding:6px;max-height:24em;overflow:auto}",
        "</style></head><body>",
        f"<h1>molre-node <span id='node-name'>{_e(node['name'])}</span></h1>",
        f"<p id='node-summary'>AE {_e(node['ae_title'])} on {_e(node['host'])}:"
        f"{_e(node['port'])} | roles {_e(', '.join(node['roles']))} | checkpoint "
        f"{_e(node['checkpoint'])} | shadow models {_e(', '.join(node['shadow_models']) or 'none')}"
        f" | generated {_e(data['generated_at'])}</p>",
        f"<p id='inference'>inference: <b>{_e(_inference_text(node.get('inference') or {}))}"
        "</b></p>",
        _table("Queue", counts, count_cols, "queue"),
        _table(
            "Workers",
            q["workers"],
            [
                "id",
                "busy",
                "alive",
                "inference",
                "engine_pid",
                "model",
                "checkpoint_hash",
                "shadows",
            ],
            "workers",
        ),
        _table(
            "Recent series",
            data["series"],
            ["series_uid", "state", "version", "instances", "site", "reason", "updated_at"]
            + (["accession_number"] if node["store_phi"] else []),
            "series",
        ),
        _table(
            "Deliveries per destination",
            data["deliveries"],
            [
                "destination",
                "pending",
                "delivered",
                "attempts",
                "retries",
                "oldest_pending",
                "last_error",
            ],
            "deliveries",
        ),
        _table(
            "Notifications per channel",
            data["notifications"],
            ["channel", "kind", "pending", "delivered", "rejected", "attempts", "last_error"],
            "notifications",
        ),
        _table("Latency (seconds)", lat, ["interval", "n", "p50_s", "p90_s", "p99_s"], "latency"),
        _table(
            f"Positive rate per finding per day (last {data['positive_rate']['days']} days)",
            data["positive_rate"]["by_day"],
            ["day", "finding", "n", "positives", "rate"],
            "rate-day",
        ),
        _table(
            "Positive rate per site / scanner",
            data["positive_rate"]["by_site"],
            ["site", "finding", "n", "positives", "rate"],
            "rate-site",
        ),
        _table(
            "Shadow models: primary vs shadow per finding (last "
            f"{data['positive_rate']['days']} days)",
            data["shadow"]["agreement"],
            [
                "model",
                "finding",
                "n",
                "agreement",
                "kappa",
                "primary_positive",
                "shadow_positive",
                "primary_only",
                "shadow_only",
                "mean_abs_prob_diff",
            ],
            "shadow",
        ),
        f"<section id='config'><h2>Configuration</h2><pre>{_e(cfg)}</pre></section>",
        "</body></html>",
    ]
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------


class Dashboard:
    """The HTTP server in a daemon thread; `start()` returns the bound port."""

    def __init__(self, config: NodeConfig, store: DashboardStore, service: Any = None) -> None:
        self.config = config
        self.store = store
        self.service = service
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def authorized(self, headers: Any, query: dict[str, list[str]]) -> bool:
        d = self.config.dashboard
        if not d.token and not d.username:
            return True
        auth = headers.get("Authorization") or ""
        if d.token:
            given = (
                auth[7:].strip()
                if auth[:7].lower() == "bearer "
                else (query.get("token") or [""])[0]
            )
            if given and hmac.compare_digest(given.encode(), d.token.encode()):
                return True
        if d.username and auth[:6].lower() == "basic ":
            try:
                user, _, pw = base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(user.encode(), d.username.encode()) and hmac.compare_digest(
                pw.encode(), d.password.encode()
            )
        return False

    def start(self) -> int:
        dash = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "molre-node"
            sys_version = ""

            def log_message(self, fmt: str, *args: Any) -> None:  # no query strings (tokens)
                pass

            def _send(
                self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header(
                    "Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"
                )
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                if url.path == "/healthz":
                    return self._send(200, b"ok\n", "text/plain; charset=utf-8")
                if url.path == "/readyz":  # 503 until the inference process has loaded
                    st = inference_status(dash.service)
                    text = "ready" if st["ready"] else f"not ready: inference {st['state']}"
                    return self._send(
                        200 if st["ready"] else 503,
                        (text + "\n").encode(),
                        "text/plain; charset=utf-8",
                    )
                if not dash.authorized(self.headers, parse_qs(url.query)):
                    extra = (
                        {"WWW-Authenticate": 'Basic realm="molre-node"'}
                        if dash.config.dashboard.username
                        else {}
                    )
                    return self._send(401, b"unauthorized\n", "text/plain; charset=utf-8", extra)
                if url.path not in ("/", "/index.html", "/api/status"):
                    return self._send(404, b"not found\n", "text/plain; charset=utf-8")
                try:
                    data = collect(dash.store, dash.config, dash.service)
                except Exception as exc:  # noqa: BLE001 - a page error never hurts the node
                    log.exception("dashboard query failed")
                    return self._send(
                        500, f"error: {type(exc).__name__}\n".encode(), "text/plain; charset=utf-8"
                    )
                if url.path == "/api/status":
                    body = json.dumps(data, default=str, indent=1).encode("utf-8")
                    return self._send(200, body, "application/json")
                return self._send(
                    200, render_html(data).encode("utf-8"), "text/html; charset=utf-8"
                )

            do_HEAD = do_GET

        d = self.config.dashboard
        self._server = ThreadingHTTPServer((d.host, d.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard", daemon=True
        )
        self._thread.start()
        log.info(
            "dashboard listening",
            host=d.host,
            port=self.port,
            auth="token" if d.token else ("basic" if d.username else "none"),
        )
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["Dashboard", "collect", "render_html"]
