"""Test support: a real Orthanc PACS on loopback ports, driven over its REST API.

Why a real Orthanc and not a mock: the node must interoperate with what hospitals run. Orthanc
negotiates its own presentation contexts, retries, and indexes what it receives; a mock SCP would
only confirm our own assumptions. Each fixture starts its own Orthanc process with a JSON
configuration in a temporary directory (storage, index and log in that directory, free ports,
no plugins, no authentication, loopback only), so tests never collide with a system service
(the Debian package may run one on 4242/8042 — we never use those ports).

REST helpers use urllib only (no extra dependency).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nodeproc import dcmtk_tool, free_port  # noqa: F401 (dcmtk_tool re-exported)

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or None (tests then skip with a reason)."""
    env = shutil.which("Orthanc")
    if env:
        return env
    for cand in ORTHANC_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


def have_dcmtk(*tools: str) -> bool:
    """True when every named dcmtk tool (default: storescu, echoscu) is installed."""
    try:
        for tool in tools or ("storescu", "echoscu"):
            dcmtk_tool(tool)
        return True
    except FileNotFoundError:
        return False


class OrthancError(RuntimeError):
    """A REST call to the test Orthanc failed; carries the HTTP status and body."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class OrthancServer:
    """A running Orthanc process plus small REST helpers."""

    http_port: int
    dicom_port: int
    aet: str
    workdir: Path
    process: subprocess.Popen
    config: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def log_tail(self, n: int = 60) -> str:
        """Last lines of Orthanc's own log — attached to assertion messages on failure."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no orthanc log)"

    # ---- raw REST ---------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | list | None = None,
        content_type: str | None = None,
        timeout: float = 120.0,
    ) -> bytes:
        data: bytes | None
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        else:
            data = body
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(
                method, path, exc.code, exc.read().decode(errors="replace")
            ) from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path) or b"null")

    def post_json(self, path: str, body: Any, timeout: float = 120.0) -> Any:
        raw = self.request(
            "POST",
            path,
            json.dumps(body).encode(),
            content_type="application/json",
            timeout=timeout,
        )
        return json.loads(raw) if raw.strip() else None

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)

    # ---- domain helpers ---------------------------------------------------------------------
    def alive(self) -> bool:
        try:
            self.get_json("/system")
            return True
        except (OSError, OrthancError):
            return False

    def upload(self, data: bytes | Path) -> dict:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, Status, ParentStudy)."""
        payload = data.read_bytes() if isinstance(data, Path) else data
        raw = self.request("POST", "/instances", payload, content_type="application/dicom")
        return json.loads(raw)

    def upload_files(self, paths: Sequence[Path]) -> list[dict]:
        answers = [self.upload(Path(p)) for p in paths]
        bad = [a for a in answers if a.get("Status") not in ("Success", "AlreadyStored")]
        if bad:
            raise AssertionError(f"Orthanc refused uploads: {bad[:3]}")
        return answers

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a DICOM modality at run time — Orthanc accepts PUT /modalities."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    def echo(self, modality: str, timeout: int = 10) -> bool:
        try:
            self.request("POST", f"/modalities/{modality}/echo", {"Timeout": timeout})
            return True
        except OrthancError:
            return False

    def store_to(self, modality: str, resources: Sequence[str], timeout: int = 120) -> Any:
        """Ask Orthanc to C-STORE resources (study/series/instance IDs) to a modality; blocks."""
        return self.post_json(
            f"/modalities/{modality}/store",
            {"Resources": list(resources), "Synchronous": True, "Timeout": timeout},
            timeout=timeout + 30,
        )

    def study_id(self, study_uid: str) -> str | None:
        for hit in self.lookup(study_uid):
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def lookup(self, uid: str) -> list[dict]:
        """Orthanc IDs for a DICOM UID (study/series/instance); the body is the bare UID."""
        raw = self.request("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
        return json.loads(raw)

    def study_series(self, study_id: str) -> list[dict]:
        return self.get_json(f"/studies/{study_id}/series")

    def series_instances(self, series_id: str) -> list[dict]:
        return self.get_json(f"/series/{series_id}/instances")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def orthanc_config(
    workdir: Path,
    http_port: int,
    dicom_port: int,
    aet: str,
    modalities: dict[str, tuple[str, str, int]] | None = None,
    stable_age: int = 1,
    extra: dict | None = None,
) -> dict:
    """The JSON configuration a test Orthanc runs with (all state under `workdir`)."""
    storage = workdir / "storage"
    cfg: dict[str, Any] = {
        "Name": "molre-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {name: [a, h, p] for name, (a, h, p) in (modalities or {}).items()},
        "DicomScuTimeout": 30,
        "DicomAssociationCloseDelay": 0,
        "StableAge": stable_age,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "HttpTimeout": 120,
        "LimitFindResults": 0,
        "OverwriteInstances": False,
        "KeepAlive": False,
    }
    if extra:
        cfg.update(extra)
    return cfg


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    stable_age: int = 1,
    extra: dict | None = None,
    startup_timeout: float = 60.0,
) -> OrthancServer:
    """Start Orthanc with its own config in `workdir`; wait until /system answers."""
    binary = orthanc_binary()
    if binary is None:
        raise FileNotFoundError("Orthanc executable not found (apt-get install orthanc)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):  # a picked port can be taken in between; retry with new ones
        http_port, dicom_port = free_port(), free_port()
        if http_port == dicom_port:
            continue
        cfg = orthanc_config(workdir, http_port, dicom_port, aet, modalities, stable_age, extra)
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        log = open(workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [binary, str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
        log.close()
        server = OrthancServer(http_port, dicom_port, aet, workdir, proc, cfg)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if server.alive():
                return server
            time.sleep(0.2)
        last_error = server.log_tail()
        server.stop()
    raise RuntimeError(f"Orthanc did not start; log:\n{last_error}")


@contextmanager
def orthanc_server(workdir: Path, **kwargs: Any) -> Iterator[OrthancServer]:
    """Context-managed `start_orthanc` that always stops the process."""
    server = start_orthanc(workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# reading results back (shared by the real-client, fault and load tests)
# ---------------------------------------------------------------------------------------------


def sr_findings(sr_file: bytes | Path) -> dict[str, tuple[float, bool]]:
    """Findings of a molre-node SR read back with `highdicom.sr.srread`.

    Returns tracking identifier (= catalog key) -> (probability, present). Parsing through
    highdicom (not by walking our own tags) checks that the SR is a well-formed TID 1500
    document another implementation can read.
    """
    import io

    import highdicom as hd
    from pydicom.sr.coding import Code

    presence = Code("121052", "DCM", "Presence of property")
    present = Code("52101004", "SCT", "Present")
    probability = Code("122157", "DCM", "Probability")
    src = io.BytesIO(sr_file) if isinstance(sr_file, bytes) else str(sr_file)
    sr = hd.sr.srread(src)
    out: dict[str, tuple[float, bool]] = {}
    for group in sr.content.get_image_measurement_groups():
        key = str(group.tracking_identifier)
        meas = group.get_measurements(name=probability)
        evals = group.get_qualitative_evaluations(name=presence)
        if len(meas) != 1 or len(evals) != 1:
            raise AssertionError(
                f"group {key}: {len(meas)} probabilities, {len(evals)} presence evaluations"
            )
        out[key] = (float(meas[0].value), evals[0].value == present)
    return out


def sr_source_series(ds: Any) -> set[str]:
    """Series UIDs an SR names as evidence (Current Requested Procedure Evidence Sequence)."""
    uids: set[str] = set()
    for study in getattr(ds, "CurrentRequestedProcedureEvidenceSequence", []):
        for series in getattr(study, "ReferencedSeriesSequence", []):
            uids.add(str(series.SeriesInstanceUID))
    return uids


def audit_results(db: Path, series_uid: str) -> dict[str, tuple[float, bool]]:
    """The node's stored results for the latest version of a series (read-only SQLite)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        version = con.execute(
            "select max(series_version) from results where series_uid = ?", (series_uid,)
        ).fetchone()[0]
        rows = con.execute(
            "select finding_key, probability, decision from results "
            "where series_uid = ? and series_version = ?",
            (series_uid, version),
        ).fetchall()
    finally:
        con.close()
    return {k: (float(p), bool(d)) for k, p, d in rows}


def sql(db: Path, query: str, *args: Any) -> list[tuple]:
    """Run a read-only query on the node's SQLite audit database."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def model_section() -> dict[str, Any]:
    """The `[model]` config section for node tests.

    Empty = the packaged demo checkpoint (what CI uses). `MOLRE_TEST_CHECKPOINT=/path` runs the
    real-client, fault and load tests against another checkpoint (e.g. a trained one).
    """
    path = os.environ.get("MOLRE_TEST_CHECKPOINT", "")
    return {"checkpoint": path} if path else {}
