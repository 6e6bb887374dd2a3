"""Critical-finding notifications (issue 17): rules, the outbox discipline, a real HTTP server
and a real MLLP listener started by the test; shadow-mode agreement arithmetic.

The real-node test (dashboard in Chromium + shadow model + both channels) is in
tests/test_dashboard_node.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from node.config import config_from_dict
from node.notify import Notifier, control_id, match_rules, parse_ack
from storage import Database, FindingResult, InstanceHeader, Store
from storage.notices import NotificationSpec
from tests.nodeproc import free_port

SECRET = "s3cret-key"


# ---------------------------------------------------------------------------------------------
# receivers started by the tests
# ---------------------------------------------------------------------------------------------


class WebhookServer:
    """A real HTTP server collecting POSTs; `status` is what it answers."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = 200
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "WebhookServer":
        hook = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append(({k: v for k, v in self.headers.items()}, body))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


class MLLPListener:
    """A real MLLP listener (TCP, 0x0B ... 0x1C 0x0D frames) answering each message with an
    ACK whose MSA-1 comes from `codes` (the last one repeats)."""

    def __init__(self, codes: list[str]) -> None:
        self.port = free_port()
        self.codes = list(codes)
        self.messages: list[str] = []
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> "MLLPListener":
        lst = self

        class H(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = b""
                while b"\x1c\x0d" not in buf:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                text = buf[buf.index(b"\x0b") + 1 : buf.index(b"\x1c\x0d")].decode()
                lst.messages.append(text)
                msh = text.split("\r")[0].split("|")
                code = lst.codes.pop(0) if len(lst.codes) > 1 else lst.codes[0]
                ack = (
                    f"MSH|^~\\&|RIS|HOSP|{msh[2]}|{msh[3]}|20261203120000||ACK^R01^ACK|"
                    f"A{len(lst.messages)}|P|2.5\rMSA|{code}|{msh[9]}|"
                    f"{'bad OBX' if code != 'AA' else ''}\r"
                )
                self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\x0d")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), H)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


def _config(channels: list[dict[str, Any]], rules: list[dict[str, Any]], tmp: Path):
    return config_from_dict(
        {
            "storage": {"data_dir": str(tmp / "data")},
            "notifications": {
                "enabled": True,
                "channels": channels,
                "rules": rules,
                "backoff_base_s": 10.0,
                "backoff_max_s": 40.0,
            },
        }
    )


def _reported_series(store: Store, specs: list[NotificationSpec], uid: str = "1.2.3.4.5") -> None:
    """A series carried through the queue to 'reported' with `specs` as notifications."""
    h = InstanceHeader(
        sop_instance_uid=uid + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2.3.4",
        series_uid=uid,
        modality="CT",
        accession_number="ACC77",
        meta={"Manufacturer": "ACME"},
        phi={"PatientName": "DOE^JANE", "PatientID": "PID-SECRET"},
    )
    store.record_instance(
        None, h, status="stored", spool_path="/nonexistent", size=1, sha256="0" * 64
    )
    for state in ("complete", "selected"):
        store.transition(uid, state)
    store.enqueue_job(uid)
    job = store.claim_job("w1", lease_s=60, max_attempts=3)
    store.finish_job(
        job.id,
        results=[FindingResult("intraparenchymal_hemorrhage", 0.93, True)],
        checkpoint_hash="c" * 64,
        model_name="test-model",
        report_path=None,
        report_sop_uid="1.2.3.4.5.99",
        destinations=[],
        notifications=specs,
    )


def _events(store: Store, kind: str) -> list[dict[str, Any]]:
    return [
        e
        for e in store.timeline("1.2.3.4.5")
        if e["entity"] == "notification" and e["kind"] == kind
    ]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_rules_pick_findings_by_decision_or_threshold(tmp_path: Path) -> None:
    cfg = _config(
        [
            {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": SECRET},
            {"name": "ris", "kind": "hl7-mllp", "host": "127.0.0.1", "port": 9},
        ],
        [
            {"finding": "subdural_hemorrhage", "channels": ["hook", "ris"]},
            {"finding": "*", "threshold": 0.9, "channels": ["hook"]},
        ],
        tmp_path,
    )
    probs = {"subdural_hemorrhage": 0.4, "acute_infarct": 0.95, "hydrocephalus": 0.2}
    got = match_rules(cfg, probs, {"subdural_hemorrhage": True, "acute_infarct": False})
    assert sorted((n.finding_key, n.channel) for n in got) == [
        ("acute_infarct", "hook"),
        ("subdural_hemorrhage", "hook"),
        ("subdural_hemorrhage", "ris"),
    ]
    # decision rule: an Absent finding is not sent even at a high probability
    assert match_rules(cfg, {"subdural_hemorrhage": 0.8}, {"subdural_hemorrhage": False}) == []
    cfg.notifications.enabled = False
    assert match_rules(cfg, probs, {"subdural_hemorrhage": True}) == []


def test_webhook_signed_retried_while_down_then_delivered_once(tmp_path: Path) -> None:
    hook = WebhookServer()  # not started yet: the receiver is down
    cfg = _config(
        [
            {
                "name": "hook",
                "kind": "webhook",
                "url": hook.url(),
                "secret": SECRET,
                "timeout_s": 3.0,
            }
        ],
        [{"finding": "intraparenchymal_hemorrhage", "channels": ["hook"]}],
        tmp_path,
    )
    clock = Clock()
    db = Database(tmp_path / "a.db")
    db.upgrade()
    store = Store(db, clock=clock, node="n1")
    specs = match_rules(
        cfg, {"intraparenchymal_hemorrhage": 0.93}, {"intraparenchymal_hemorrhage": True}
    )
    _reported_series(store, specs)
    notifier = Notifier(cfg, store)
    assert notifier.tick() == 1  # connection refused
    row = store.notifications()[0]
    assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 1, None)
    assert "Connection refused" in row["last_error"] or "refused" in row["last_error"].lower()
    assert row["next_attempt_at"] == clock.t + dt.timedelta(seconds=10)
    assert notifier.tick() == 0  # backing off: not due yet
    hook.status = 503
    hook.start()
    try:
        clock.advance(10)
        assert notifier.tick() == 1  # 503: retried, doubled backoff
        row = store.notifications()[0]
        assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 2, "HTTP 503")
        assert row["next_attempt_at"] == clock.t + dt.timedelta(seconds=20)
        hook.status = 204
        clock.advance(20)
        assert notifier.tick() == 1
        clock.advance(3600)
        assert notifier.tick() == 0  # delivered: never sent again
    finally:
        hook.stop()
    row = store.notifications()[0]
    assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 3, "HTTP 204")
    assert len(hook.posts) == 2
    headers, body = hook.posts[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Molre-Signature"] == expected
    assert headers["X-Molre-Delivery"] == str(row["id"]) == hook.posts[0][0]["X-Molre-Delivery"]
    doc = json.loads(body)
    assert doc["finding"]["key"] == "intraparenchymal_hemorrhage"
    assert doc["finding"]["decision"] == "Present" and doc["finding"]["probability"] == 0.93
    assert doc["series_instance_uid"] == "1.2.3.4.5" and doc["model"] == "test-model"
    assert doc["report_sop_instance_uid"] == "1.2.3.4.5.99"
    assert doc["accession_number"] == "ACC77"
    assert b"PID-SECRET" not in body and b"DOE" not in body and "patient" not in doc
    assert [e["details"]["status"] for e in _events(store, "attempt_failed")] == [None, "HTTP 503"]
    assert len(_events(store, "delivered")) == 1 and len(_events(store, "created")) == 1


def test_hl7_oru_over_mllp_ack_ae_retried_aa_delivered_ar_rejected(
    tmp_path: Path, db_url: str
) -> None:
    from hl7apy.parser import parse_message

    ok_after_error = MLLPListener(["AE", "AA"]).start()
    refuses = MLLPListener(["AR"]).start()
    try:
        cfg = _config(
            [
                {
                    "name": "ris",
                    "kind": "hl7-mllp",
                    "host": "127.0.0.1",
                    "port": ok_after_error.port,
                    "receiving_application": "RIS",
                },
                {"name": "strict", "kind": "hl7-mllp", "host": "127.0.0.1", "port": refuses.port},
            ],
            [{"finding": "intraparenchymal_hemorrhage", "channels": ["ris", "strict"]}],
            tmp_path,
        )
        clock = Clock()
        db = Database(db_url)
        db.upgrade()
        store = Store(db, clock=clock, node="n1")
        _reported_series(
            store,
            match_rules(
                cfg, {"intraparenchymal_hemorrhage": 0.93}, {"intraparenchymal_hemorrhage": True}
            ),
        )
        notifier = Notifier(cfg, store)
        assert notifier.tick() == 2
        clock.advance(3600)
        assert notifier.tick() == 1  # only the AE one is retried; AR is final
        clock.advance(3600)
        assert notifier.tick() == 0
    finally:
        ok_after_error.stop()
        refuses.stop()
    rows = {r["channel"]: r for r in store.notifications()}
    assert (rows["ris"]["state"], rows["ris"]["attempts"], rows["ris"]["last_status"]) == (
        "delivered",
        2,
        "AA",
    )
    assert (rows["strict"]["state"], rows["strict"]["attempts"]) == ("rejected", 1)
    assert "rejected by the receiver" in rows["strict"]["last_error"]
    assert len(_events(store, "rejected")) == 1
    # the same message (same control ID) on the retry, a well-formed ORU^R01
    first, second = ok_after_error.messages
    assert (
        first.split("\r")[0].split("|")[9]
        == second.split("\r")[0].split("|")[9]
        == control_id(rows["ris"]["id"])
    )
    msg = parse_message(second, find_groups=True)
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01" and msg.msh.msh_5.value == "RIS"
    obx = [seg for seg in second.split("\r") if seg.startswith("OBX|")]
    assert obx[0].split("|")[3].endswith("^SCT") and obx[0].split("|")[5] == "Present"
    assert obx[1].split("|")[5] == "0.9300"
    # the accession number links the result to the order (OBR-3); no patient data without
    # audit.store_phi
    assert "1.2.3.4.5" in second and "|ACC77|" in second
    assert "PID|" not in second and "DOE" not in second and "PID-SECRET" not in second
    code, ctrl, _ = parse_ack("MSH|^~\\&|A|B|C|D|20261203||ACK|1|P|2.5\rMSA|AE|X9|oops\r")
    assert (code, ctrl) == ("AE", "X9")


def test_cohen_kappa_and_agreement_by_site(tmp_path: Path) -> None:
    from storage.agreement import agreement, cohen_kappa, disagreements

    # 2x2 table 20/5/10/15: po = 0.7, pe = 0.5 -> kappa 0.4
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert cohen_kappa(3, 0, 0, 7) == pytest.approx(1.0)
    assert cohen_kappa(0, 0, 0, 5) is None  # both always negative: undefined
    db = Database(tmp_path / "a.db")
    db.upgrade()
    store = Store(db)
    decisions = [
        (True, True, "ACME"),
        (True, False, "ACME"),
        (False, False, "ZETA"),
        (False, True, "ZETA"),
    ]
    for i, (prim, shad, man) in enumerate(decisions):
        uid = f"1.2.3.{i}"
        h = InstanceHeader(
            sop_instance_uid=uid + ".1",
            sop_class_uid="1.2",
            study_uid="1.2",
            series_uid=uid,
            modality="CT",
            meta={"Manufacturer": man},
        )
        store.record_instance(None, h, status="stored", spool_path="/x", size=1, sha256="0" * 64)
        store.transition(uid, "complete")
        store.transition(uid, "selected")
        store.enqueue_job(uid)
        job = store.claim_job("w", lease_s=60, max_attempts=3)
        store.finish_job(
            job.id,
            results=[FindingResult("acute_infarct", 0.6 if prim else 0.1, prim)],
            checkpoint_hash=None,
            model_name="primary",
            report_path=None,
            report_sop_uid=None,
            destinations=[],
        )
        store.record_shadow_results(
            job_id=job.id,
            series_uid=uid,
            version=1,
            model_name="cand",
            model_version="2",
            checkpoint_hash=None,
            results=[FindingResult("acute_infarct", 0.7 if shad else 0.2, shad)],
        )
    with db.session(write=False) as s:
        (row,) = agreement(s)
        by_man = agreement(s, by="manufacturer")
        diff = disagreements(s)
    assert (row["n"], row["agreement"], row["kappa"]) == (4, 0.5, 0.0)
    assert (row["primary_positive"], row["shadow_positive"]) == (2, 2)
    assert [(r["manufacturer"], r["agreement"]) for r in by_man] == [("ACME", 0.5), ("ZETA", 0.5)]
    assert sorted(d["series_uid"] for d in diff) == ["1.2.3.1", "1.2.3.3"]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {
                "notifications": {
                    "channels": [{"name": "h", "kind": "webhook", "url": "http://127.0.0.1/x"}]
                }
            },
            "notifications.channels[0].secret: required",
        ),
        (
            {"notifications": {"channels": [{"name": "h", "kind": "smtp"}]}},
            "notifications.channels[0].kind: expected one of webhook, hl7-mllp",
        ),
        (
            {"notifications": {"rules": [{"finding": "x", "channels": ["nope"]}]}},
            "notifications.rules[0].channels: unknown channel 'nope'",
        ),
        ({"notifications": {"enabled": True}}, "notifications.rules: notifications.enabled"),
        ({"dashboard": {"host": "0.0.0.0"}}, "dashboard.token: required"),
        ({"dashboard": {"username": "u"}}, "dashboard.username / dashboard.password"),
        ({"model": {"shadow": [{"name": "a b", "checkpoint": "demo"}]}}, "model.shadow[0].name"),
        ({"model": {"shadow": [{"name": "a"}]}}, "model.shadow[0].checkpoint: required"),
    ],
)
def test_bad_issue17_config_names_the_key(data: dict, message: str) -> None:
    from common.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=message.replace("[", r"\[")
        .replace("]", r"\]")
        .replace("(", r"\(")
        .replace(".", r"\."),
    ):
        config_from_dict(data)


def test_public_config_masks_secrets() -> None:
    cfg = config_from_dict(
        {
            "dashboard": {"token": "T0K", "username": "u", "password": "PW"},
            "notifications": {
                "channels": [
                    {"name": "h", "kind": "webhook", "url": "http://127.0.0.1/x", "secret": "S3C"}
                ]
            },
        }
    )
    text = json.dumps(cfg.public_dict())
    assert "T0K" not in text and "PW" not in text and "S3C" not in text
    assert cfg.dashboard.token == "T0K"  # the live object keeps them


def test_a_dead_notifiers_claim_is_taken_over_or_released_at_restart(
    tmp_path: Path, db_url: str
) -> None:
    """A node killed mid-send: another node takes the notification when the lease expires
    ('reclaimed' names the dead one); the dead node itself, restarted, releases its claims at
    once (recover_on_start)."""
    cfg = _config(
        [{"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": SECRET}],
        [{"finding": "intraparenchymal_hemorrhage", "channels": ["hook"]}],
        tmp_path,
    )
    specs = match_rules(
        cfg, {"intraparenchymal_hemorrhage": 0.9}, {"intraparenchymal_hemorrhage": True}
    )
    clock = Clock()
    db = Database(db_url)
    db.upgrade()
    n1, n2 = Store(db, clock=clock, node="n1"), Store(db, clock=clock, node="n2")
    _reported_series(n1, specs)
    spec2 = NotificationSpec(
        channel="hook", kind="webhook", finding_key="acute_infarct", probability=0.8, decision=True
    )
    _reported_series(n1, [spec2], uid="1.2.3.4.6")
    assert len(n1.claim_notifications(lease_s=60)) == 2  # n1 "dies" holding both
    assert n2.claim_notifications(lease_s=60) == []  # held: nobody else sends them
    clock.advance(61)
    (taken,) = n2.claim_notifications(lease_s=60, limit=1)
    ev = [e for e in n2.timeline(taken.series_uid) if e["kind"] == "reclaimed"]
    assert ev and ev[0]["details"]["previous_node"] == "n1"
    # n1 restarts: its remaining claim is released at once, not after the lease
    assert n1.recover_on_start()["notifications_released"] == 1
    (again,) = n1.claim_notifications(lease_s=60)
    assert again.id != taken.id


def test_dashboard_auth_and_content_without_a_browser(tmp_path: Path) -> None:
    """Token and basic auth, 401/404, /healthz; a failed delivery shows its error and a
    rejected notification its state (the browser test covers the happy path)."""
    import base64
    import urllib.error
    import urllib.request

    from node.dashboard import Dashboard

    port = free_port()
    cfg = config_from_dict(
        {
            "storage": {"data_dir": str(tmp_path / "d")},
            "dashboard": {"port": port, "token": "TT", "username": "op", "password": "pw"},
        }
    )
    db = Database(tmp_path / "a.db")
    db.upgrade()
    store = Store(db)
    spec = NotificationSpec(
        channel="ris", kind="hl7-mllp", finding_key="acute_infarct", probability=0.8, decision=True
    )
    _reported_series(store, [spec])
    (n,) = store.claim_notifications()
    store.record_notification_attempt(
        n.id, ok=False, status="AR", error="rejected: bad PID", final=True
    )
    dash = Dashboard(cfg, store)
    dash.start()

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert get("/healthz") == (200, "ok\n")
        assert get("/")[0] == 401 and get("/?token=nope")[0] == 401
        basic = "Basic " + base64.b64encode(b"op:pw").decode()
        wrong = "Basic " + base64.b64encode(b"op:no").decode()
        assert get("/", {"Authorization": wrong})[0] == 401
        code, page = get("/", {"Authorization": basic})
        assert code == 200 and "1.2.3.4.5" in page
        code, body = get("/api/status?token=TT")
        assert code == 200
        assert get("/nothing?token=TT")[0] == 404
    finally:
        dash.stop()
    data = json.loads(body)
    (ch,) = data["notifications"]
    assert (ch["channel"], ch["rejected"], ch["last_error"]) == ("ris", 1, "rejected: bad PID")
    assert "accession_number" not in data["series"][0]  # store_phi off
    assert data["series"][0]["site"] == "ACME" and data["config"]["dashboard"]["password"] == "***"
