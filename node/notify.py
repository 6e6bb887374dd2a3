"""Critical-finding notifications: rules, an HTTP webhook and HL7 v2 ORU^R01 over MLLP.

Why an outbox (the export discipline, :mod:`storage.notices`): an urgent finding must reach
someone even if the receiver is down when the series is read, or the node restarts. The worker
turns the configured rules into notification rows *in the same transaction* as the results
(:func:`match_rules` -> ``Store.finish_job(notifications=...)``); the :class:`Notifier` (nodes
with the ``dispatch`` role) claims due rows under a lease, sends each once, and records the
attempt: delivered, or retried after ``min(backoff_max_s, backoff_base_s * 2 ** (attempts-1))``
seconds -- forever. Nothing is dropped; every attempt is an audit event.

Channels
- ``webhook``: ``POST`` of a JSON document (:func:`webhook_payload`) with
  ``X-Molre-Signature: sha256=<hex HMAC-SHA256 of the body under the channel secret>``,
  ``X-Molre-Delivery: <notification id>`` (the same on every retry: receivers de-duplicate on
  it) and ``X-Molre-Timestamp``. Any 2xx = delivered; anything else, or no answer, is retried.
- ``hl7-mllp``: an HL7 v2.5 ORU^R01 (built with hl7apy) in an MLLP frame; the receiver's ACK
  decides: MSA-1 ``AA``/``CA`` = delivered, ``AE``/``CE`` (application error) = retried, ``AR``/
  ``CR`` (the receiver refuses the message itself; resending it cannot help) = 'rejected', a
  final state that the audit trail, ``molre-node audit notifications`` and the dashboard show.
  No ACK, a garbled ACK or an ACK for another message control ID is retried. The message
  control ID (MSH-10) is ``MOLRE-N<id>`` on every retry.

No PHI leaves in a notification unless ``audit.store_phi`` is on (then PID-3/PID-5 and the JSON
``patient`` object carry what the audit database holds): UIDs, the accession number, the
finding, its probability and the model identify the case.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.log import get_logger, redact
from node.background import DrainLoop
from node.config import NodeConfig, NotifyChannel
from node.interfaces import NotifierStore

if TYPE_CHECKING:
    from storage.notices import NotificationClaim, NotificationSpec

log = get_logger("node.notify")

#: Notifications claimed per pass.
CLAIM_BATCH = 10
SIGNATURE_HEADER = "X-Molre-Signature"
MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"


def backoff_s(attempts: int, base: float, ceiling: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (exponential, capped)."""
    return float(min(ceiling, base * (2 ** max(0, attempts - 1))))


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------


def match_rules(
    config: NodeConfig, probabilities: dict[str, float], decisions: dict[str, bool]
) -> list[NotificationSpec]:
    """The notifications the rules ask for, one per (finding, channel) (a finding matched by
    several rules goes once to each channel). Empty when notifications are off."""
    from storage.notices import NotificationSpec

    nt = config.notifications
    if not nt.enabled:
        return []
    kinds = {c.name: c.kind for c in nt.channels}
    out: dict[tuple[str, str], NotificationSpec] = {}
    for rule in nt.rules:
        keys = list(probabilities) if rule.finding == "*" else [rule.finding]
        for key in keys:
            if key not in probabilities:
                continue
            p = float(probabilities[key])
            decision = bool(decisions.get(key, False))
            hit = p >= rule.threshold if rule.threshold > 0 else decision
            if not hit:
                continue
            text = (
                f"{rule.finding} probability >= {rule.threshold:g}"
                if rule.threshold > 0
                else f"{rule.finding} Present"
            )
            for ch in rule.channels:
                out.setdefault(
                    (key, ch),
                    NotificationSpec(
                        channel=ch,
                        kind=kinds[ch],
                        finding_key=key,
                        probability=p,
                        decision=decision,
                        rule=text,
                    ),
                )
    return list(out.values())


def unknown_rule_findings(config: NodeConfig, keys: Sequence[str]) -> list[str]:
    """Rule findings the model does not report (a typo, or another checkpoint's catalog)."""
    known = set(keys)
    return [
        r.finding for r in config.notifications.rules if r.finding != "*" and r.finding not in known
    ]


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------


def _finding_code(key: str) -> tuple[str, str, str]:
    """(code value, meaning, coding scheme) of a catalog key, e.g. SNOMED CT for the packaged
    catalog; the key itself in a local scheme otherwise."""
    try:
        from molre.catalog import load_catalog

        f = load_catalog().get(key)
        return f.value, f.meaning, f.scheme
    except Exception:  # noqa: BLE001 - another catalog: the key is still a stable code
        return key, key.replace("_", " "), "MOLRE"


def webhook_payload(n: NotificationClaim) -> dict[str, Any]:
    """The JSON document a webhook receives (docs/operations.md, "Notifications")."""
    value, meaning, scheme = _finding_code(n.finding_key)
    doc: dict[str, Any] = {
        "type": "molre.finding",
        "notification_id": n.id,
        "finding": {
            "key": n.finding_key,
            "code": value,
            "scheme": scheme,
            "meaning": meaning,
            "probability": round(float(n.probability), 6),
            "decision": "Present" if n.decision else "Absent",
        },
        "rule": n.rule,
        "model": n.model_name,
        "study_instance_uid": n.study_uid,
        "series_instance_uid": n.series_uid,
        "series_version": n.version,
        "report_sop_instance_uid": n.report_sop_uid,
        "accession_number": n.accession_number,
        "created_at": n.created_at.isoformat() if n.created_at else None,
    }
    if n.patient_id or n.patient_name:  # only with audit.store_phi
        doc["patient"] = {"id": n.patient_id, "name": n.patient_name}
    return doc


def sign(secret: str, body: bytes) -> str:
    """The ``X-Molre-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


_HL7_SPECIAL = re.compile(r"[|^~\\&\r\n]")


def _hl7_text(value: Any, n: int = 199) -> str:
    """A value safe inside one HL7 component (delimiters and line breaks removed)."""
    return _HL7_SPECIAL.sub(" ", str(value or ""))[:n]


def control_id(notification_id: int) -> str:
    return f"MOLRE-N{notification_id}"


def build_oru(n: NotificationClaim, channel: NotifyChannel, now: dt.datetime | None = None) -> str:
    """An HL7 v2.5 ORU^R01 (ER7, segments separated by CR) for one notification."""
    from hl7apy.core import Message

    now = now or dt.datetime.now(dt.timezone.utc)
    value, meaning, scheme = _finding_code(n.finding_key)
    m = Message("ORU_R01", version="2.5")
    m.msh.msh_3 = _hl7_text(channel.sending_application or "MOLRE")
    if channel.sending_facility:
        m.msh.msh_4 = _hl7_text(channel.sending_facility)
    if channel.receiving_application:
        m.msh.msh_5 = _hl7_text(channel.receiving_application)
    if channel.receiving_facility:
        m.msh.msh_6 = _hl7_text(channel.receiving_facility)
    m.msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id(n.id)
    m.msh.msh_11 = "P"
    pr = m.add_group("ORU_R01_PATIENT_RESULT")
    if n.patient_id or n.patient_name:  # only with audit.store_phi
        pat = pr.add_group("ORU_R01_PATIENT")
        pat.pid.pid_3 = _hl7_text(n.patient_id or "", 64)
        if n.patient_name:  # DICOM PN Family^Given^... maps onto XPN's components
            pat.pid.pid_5 = "^".join(
                _hl7_text(p, 64) for p in str(n.patient_name).split("=")[0].split("^")[:5]
            )
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.obr.obr_1 = "1"
    if n.accession_number:
        oo.obr.obr_3 = _hl7_text(n.accession_number, 64)
    oo.obr.obr_4 = "MOLRE-CTHEAD^Head CT AI finding^L"
    oo.obr.obr_7 = n.created_at.strftime("%Y%m%d%H%M%S") if n.created_at else m.msh.msh_7.value
    oo.obr.obr_25 = "P"  # preliminary: an AI finding awaiting a radiologist
    obs = [
        (
            "CE",
            f"{_hl7_text(value)}^{_hl7_text(meaning)}^{_hl7_text(scheme)}",
            "Present" if n.decision else "Absent",
        ),
        ("NM", "probability^Model probability^L", f"{float(n.probability):.4f}"),
        ("ST", "model^Model^L", _hl7_text(n.model_name or "")),
        ("ST", "rule^Notification rule^L", _hl7_text(n.rule or "")),
        ("ST", "110180^Study Instance UID^DCM", _hl7_text(n.study_uid, 64)),
        ("ST", "112002^Series Instance UID^DCM", _hl7_text(n.series_uid, 64)),
    ]
    if n.report_sop_uid:
        obs.append(("ST", "121126^Retrieve Location UID^DCM", _hl7_text(n.report_sop_uid, 64)))
    for i, (vt, ident, val) in enumerate(obs, start=1):
        ob = oo.add_group("ORU_R01_OBSERVATION")
        ob.obx.obx_1 = str(i)
        ob.obx.obx_2 = vt
        ob.obx.obx_3 = ident
        ob.obx.obx_5 = val
        ob.obx.obx_11 = "P"
    return m.to_er7()


def parse_ack(text: str) -> tuple[str, str, str]:
    """(MSA-1 acknowledgment code, MSA-2 control ID, MSA-3 / ERR text) of an HL7 ACK.
    Raises ValueError when it is not an ACK."""
    from hl7apy.parser import parse_message

    msg = parse_message(text.replace("\n", "\r").strip("\r") + "\r", find_groups=False)
    try:
        msa = msg.msa
    except Exception:  # noqa: BLE001 - hl7apy raises its own types for a missing segment
        raise ValueError("no MSA segment in the answer") from None
    code = (msa.msa_1.value or "").strip().upper()
    ctrl = (msa.msa_2.value or "").strip()
    err = ""
    try:
        err = msa.msa_3.value or ""
    except Exception:  # noqa: BLE001
        pass
    if not code:
        raise ValueError("MSA-1 (acknowledgment code) is empty")
    return code, ctrl, err


class SendOutcome:
    """What one attempt came to: delivered, retry later, or final rejection."""

    def __init__(
        self, ok: bool, status: str | None, error: str | None = None, final: bool = False
    ) -> None:
        self.ok, self.status, self.error, self.final = ok, status, error, final


def send_webhook(n: NotificationClaim, channel: NotifyChannel) -> SendOutcome:
    body = json.dumps(webhook_payload(n), sort_keys=True, default=str).encode("utf-8")
    req = urllib.request.Request(
        channel.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "molre-node",
            SIGNATURE_HEADER: sign(channel.secret, body),
            "X-Molre-Delivery": str(n.id),
            "X-Molre-Timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        },
    )
    # no proxies from the environment: a notification goes where the config says
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=channel.timeout_s) as resp:
            code = resp.status
    except urllib.error.HTTPError as exc:
        return SendOutcome(False, f"HTTP {exc.code}", f"HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return SendOutcome(False, None, f"{type(exc).__name__}: {reason}")
    if 200 <= code < 300:
        return SendOutcome(True, f"HTTP {code}")
    return SendOutcome(False, f"HTTP {code}", f"HTTP {code}")


def mllp_exchange(host: str, port: int, message: str, timeout: float) -> str:
    """Send one MLLP-framed message and return the framed answer's text."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
        buf = b""
        while MLLP_END not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before a complete MLLP answer")
            buf += chunk
            if len(buf) > 1 << 20:
                raise ValueError("MLLP answer larger than 1 MiB")
    start = buf.find(MLLP_START)
    return buf[start + 1 if start >= 0 else 0 : buf.find(MLLP_END)].decode("utf-8", "replace")


def send_hl7(n: NotificationClaim, channel: NotifyChannel) -> SendOutcome:
    message = build_oru(n, channel)
    try:
        answer = mllp_exchange(channel.host, channel.port, message, channel.timeout_s)
    except (OSError, ValueError) as exc:
        return SendOutcome(False, None, f"{type(exc).__name__}: {exc}")
    try:
        code, ctrl, err = parse_ack(answer)
    except Exception as exc:  # noqa: BLE001 - a garbled answer is a failed attempt
        return SendOutcome(False, "no ACK", f"answer is not an HL7 ACK: {exc}")
    if ctrl and ctrl != control_id(n.id):
        return SendOutcome(False, code, f"ACK for message {ctrl!r}, expected {control_id(n.id)!r}")
    if code in ("AA", "CA"):
        return SendOutcome(True, code)
    if code in ("AR", "CR"):
        return SendOutcome(False, code, f"rejected by the receiver: {err or code}", final=True)
    return SendOutcome(False, code, f"receiver error: {err or code}")


def send(n: NotificationClaim, channel: NotifyChannel) -> SendOutcome:
    return send_webhook(n, channel) if channel.kind == "webhook" else send_hl7(n, channel)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class Notifier(DrainLoop):
    """Background thread draining the notification outbox (nodes with the dispatch role)."""

    def __init__(self, config: NodeConfig, store: NotifierStore, *, poll_s: float = 0.5) -> None:
        super().__init__("notifier", poll_s)
        self.config = config
        self.store = store

    def lease_s(self) -> float:
        longest = max([c.timeout_s for c in self.config.notifications.channels] or [10.0])
        return 60.0 + 2 * CLAIM_BATCH * longest

    def tick(self) -> int:
        due = self.store.claim_notifications(lease_s=self.lease_s(), limit=CLAIM_BATCH)
        for n in due:
            if self._stop.is_set():
                # give the rest back at once (their claim would otherwise wait for the lease)
                self.store.record_notification_attempt(
                    n.id,
                    ok=False,
                    status=None,
                    error="node stopping; not attempted",
                    next_attempt_at=self.store.now(),
                )
                continue
            self._attempt(n)
        return len(due)

    def _attempt(self, n: Any) -> None:
        nt = self.config.notifications
        channel = next((c for c in nt.channels if c.name == n.channel), None)
        if channel is None:
            out = SendOutcome(
                False,
                None,
                f"channel {n.channel!r} is not in the configuration "
                f"([[notifications.channels]] name = {n.channel!r})",
            )
        else:
            try:
                out = send(n, channel)
            except Exception as exc:  # noqa: BLE001 - one bad notification never stops the rest
                out = SendOutcome(False, None, f"{type(exc).__name__}: {exc}")
        error = redact(out.error, 1000) if out.error else None
        if out.ok:
            self.store.record_notification_attempt(n.id, ok=True, status=out.status)
            log.info(
                "notification delivered",
                notification_id=n.id,
                channel=n.channel,
                series_uid=n.series_uid,
                finding=n.finding_key,
                attempt=n.attempts + 1,
                status=out.status,
            )
            return
        delay = backoff_s(n.attempts + 1, nt.backoff_base_s, nt.backoff_max_s)
        nxt = self.store.now() + dt.timedelta(seconds=delay)
        self.store.record_notification_attempt(
            n.id, ok=False, status=out.status, error=error, next_attempt_at=nxt, final=out.final
        )
        log.warning(
            "notification rejected" if out.final else "notification failed",
            notification_id=n.id,
            channel=n.channel,
            series_uid=n.series_uid,
            attempt=n.attempts + 1,
            status=out.status,
            error=(error or "")[:200],
            **({} if out.final else {"retry_in_s": delay}),
        )


__all__ = [
    "Notifier",
    "SIGNATURE_HEADER",
    "backoff_s",
    "build_oru",
    "control_id",
    "match_rules",
    "mllp_exchange",
    "parse_ack",
    "send",
    "sign",
    "unknown_rule_findings",
    "webhook_payload",
]
