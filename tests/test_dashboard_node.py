"""Issue 17 against the real node: one series with a planted bleed goes through `molre-node
serve` with a shadow model, two notification channels (a webhook that is down at first, an HL7
MLLP listener that answers AE before AA) and the dashboard; headless Chromium loads the
dashboard and the test asserts what is on it; `molre-node audit agreement` compares the models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.nodeproc import REPO_ROOT, NodeProcess, StorageSCP, free_port, make_ct_series, wait_until
from tests.test_notify import SECRET, MLLPListener, WebhookServer

TOKEN = "dash-token-123"
FINDING = "intraparenchymal_hemorrhage"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _shadow_checkpoint(dest: Path) -> Path:
    """The packaged demo checkpoint with every threshold at 0: a shadow model that says Present
    to everything (so it must disagree wherever the primary says Absent)."""
    from molre.checkpoint import default_checkpoint_path

    shutil.copytree(default_checkpoint_path(), dest)
    card = json.loads((dest / "model.json").read_text())
    for t in card["thresholds"].values():
        t["value"] = 0.0
    card["model_name"] = "all-present-shadow"
    (dest / "model.json").write_text(json.dumps(card))
    return dest


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_dashboard_shadow_and_notifications_on_the_real_node(tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    info = make_ct_series(
        tmp_path / "ich",
        [FINDING],
        n_slices=12,
        size=64,
        seed=3,
        Manufacturer="ACME",
        ManufacturerModelName="Brainscan 64",
    )
    hook = WebhookServer()  # down until the node has tried it
    ris = MLLPListener(["AE", "AA"]).start()
    dash_port = free_port()
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp_path / "node",
            destinations=[scp.destination()],
            model={
                "shadow": [
                    {"name": "cand", "checkpoint": str(_shadow_checkpoint(tmp_path / "shadow"))}
                ]
            },
            notifications={
                "enabled": True,
                "backoff_base_s": 0.5,
                "backoff_max_s": 1.0,
                "channels": [
                    {
                        "name": "hook",
                        "kind": "webhook",
                        "url": hook.url(),
                        "secret": SECRET,
                        "timeout_s": 5.0,
                    },
                    {"name": "ris", "kind": "hl7-mllp", "host": "127.0.0.1", "port": ris.port},
                ],
                # threshold just above 0: the rule fires whatever the demo's score,
                # so the test is about delivery, not about the model
                "rules": [{"finding": FINDING, "threshold": 1e-6, "channels": ["hook", "ris"]}],
            },
            dashboard={"port": dash_port, "token": TOKEN},
        )
        try:
            with node:
                node.send(info.paths)
                scp.wait_for(1, timeout=240)
                store = node.store()
                # the webhook receiver was down: the node keeps the notification and retries
                wait_until(
                    lambda: any(
                        r["channel"] == "hook" and r["attempts"] >= 1 for r in store.notifications()
                    ),
                    60,
                    what="a failed webhook attempt",
                )
                hook.start()
                wait_until(
                    lambda: (
                        {r["channel"]: r["state"] for r in store.notifications()}
                        == {"hook": "delivered", "ris": "delivered"}
                    ),
                    60,
                    what="both notifications delivered",
                )
                wait_until(lambda: _shadow_rows(node), 240, what="shadow results")
                base = f"http://127.0.0.1:{dash_port}"
                status, _ = _get(base + "/api/status")
                assert status == 401
                status, body = _get(base + "/api/status", {"Authorization": f"Bearer {TOKEN}"})
                assert status == 200
                api = json.loads(body)
                dom, shot = _chromium_load(chromium, f"{base}/?token={TOKEN}", tmp_path)
                agreement = _agreement(node)
        finally:
            hook.stop()
            ris.stop()
    # --- notifications: one row per channel, delivered after retries, audited -------------
    rows = {r["channel"]: r for r in store.notifications()}
    assert rows["hook"]["attempts"] >= 2 and rows["ris"]["attempts"] == 2
    assert rows["ris"]["last_status"] == "AA"
    headers, payload = hook.posts[-1]
    doc = json.loads(payload)
    assert doc["finding"]["key"] == FINDING and doc["series_instance_uid"] == info.series_uid
    assert headers["X-Molre-Signature"].startswith("sha256=")
    assert all("|ORU^R01^ORU_R01|" in m for m in ris.messages)
    assert len(ris.messages) == 2 and info.series_uid in ris.messages[-1]
    # --- shadow: recorded, never sent (the SCP got exactly the primary's SR) -------------
    assert len(scp.received) == 1
    primary = {r["finding"]: r["decision"] for r in store.findings()}
    absent = sum(1 for d in primary.values() if not d)
    assert {r["model"] for r in agreement} == {"cand"}
    per_finding = {r["finding"]: r for r in agreement}
    assert set(per_finding) == set(primary)
    assert all(r["n"] == 1 and r["shadow_positive"] == 1 for r in agreement)
    assert sum(r["shadow_only"] for r in agreement) == absent
    # --- dashboard, as the browser rendered it -------------------------------------------
    assert info.series_uid in dom
    for ident in (
        "queue",
        "workers",
        "series",
        "deliveries",
        "notifications",
        "latency",
        "rate-day",
        "rate-site",
        "shadow",
        "config",
    ):
        assert f'id="{ident}"' in dom, ident
    series_section = dom.split('id="series"')[1].split("</section>")[0]
    assert info.series_uid in series_section and "delivered" in series_section
    assert "ACME Brainscan 64" in series_section
    deliveries = dom.split('id="deliveries"')[1].split("</section>")[0]
    assert "<td>pacs</td>" in deliveries
    notes = dom.split('id="notifications"')[1].split("</section>")[0]
    assert "<td>hook</td>" in notes and "<td>ris</td>" in notes and "hl7-mllp" in notes
    site_rates = dom.split('id="rate-site"')[1].split("</section>")[0]
    assert f"<td>{FINDING}</td>" in site_rates and "ACME Brainscan 64" in site_rates
    shadow = dom.split('id="shadow"')[1].split("</section>")[0]
    assert shadow.count("<td>cand</td>") == len(primary) and f"<td>{FINDING}</td>" in shadow
    assert TOKEN not in dom.split('id="config"')[1] and SECRET not in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the JSON API says the same
    assert api["series"][0]["series_uid"] == info.series_uid
    assert {d["destination"]: d["delivered"] for d in api["deliveries"]} == {"pacs": 1}
    assert api["config"]["dashboard"]["token"] == "***"
    assert api["config"]["notifications"]["channels"][0]["secret"] == "***"
    keep = os.environ.get("MOLRE_DASHBOARD_SCREENSHOT")
    if keep:  # refresh docs/dashboard.png: MOLRE_DASHBOARD_SCREENSHOT=docs/dashboard.png
        shutil.copyfile(shot, REPO_ROOT / keep)


def _shadow_rows(node: NodeProcess) -> bool:
    from sqlalchemy import func, select

    from storage.models import ShadowResult

    store = node.store()
    with store.db.session(write=False) as s:
        return bool(s.execute(select(func.count()).select_from(ShadowResult)).scalar_one())


def _agreement(node: NodeProcess) -> list[dict]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "audit",
            "agreement",
            "--config",
            str(node.config_path),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _chromium_load(chromium: str, url: str, tmp: Path) -> tuple[str, Path]:
    """Headless Chromium: the DOM after load, and a screenshot of the page."""
    base = [chromium, *CHROMIUM_FLAGS]
    dom = subprocess.run(
        [*base, f"--user-data-dir={tmp / 'chrome-a'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "dashboard.png"
    png = subprocess.run(
        [
            *base,
            f"--user-data-dir={tmp / 'chrome-b'}",
            "--hide-scrollbars",
            "--window-size=1400,2200",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.returncode == 0 and shot.exists(), png.stderr[-2000:]
    return dom.stdout, shot
