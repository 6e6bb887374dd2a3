"""Test support: the real node as a subprocess, a collecting storage SCP, and DICOM senders.

Why a subprocess: the node's promises (Success only after the instance is durable, kill -9
safety, clean SIGTERM, one bad series never blocks others) are properties of the running
service, not of its classes. Tests therefore start `python -m cli.main serve` on a free loopback
port with a TOML config written for the test, talk DICOM to it (pynetdicom or dcmtk), and read
its audit database afterwards.

Reused by the real-client/fault tests (issue 7): keep it general.

Main pieces (all loopback, free ports)
- `free_port()`, `wait_until(pred, timeout, interval=0.2, what=...)`
- `node_config(data_dir, port, *, ae_title="MOLRE", destinations=(), quiet_time_s=1.0,
  release_grace_s=0.3, **sections) -> dict`, `write_config(path, data)`, `to_toml(data)`
- `NodeProcess.create(tmp_dir, *, port=None, ae_title="MOLRE", env=None, calling_ae="TESTSCU",
  **config)` / `NodeProcess(config_path, port=, data_dir=, ...)`: `.start(wait=True)`,
  `.wait_ready()` (C-ECHO), `.stop()` (SIGTERM -> exit status), `.kill()` (SIGKILL of the whole
  process group), `.restart()`, `.alive`, `.send(paths)`, `.store()` (storage.Store on the
  node's DB), `.wait_series_state(uid, states)`, `.log_text()`, `.log_tail()`,
  `.log_records()`, `.data_dir`, `.port`, `.ae_title`, `.database_url`; context manager
- `StorageSCP(ae_title="TESTSCP", port=None, store_dir=None, ssl_context=None)`: a thread
  collecting C-STORE datasets (`.received`, `.calling_aes`, `.fail_next`, `.wait_for(n)`,
  `.destination(name)` -> a `[[destinations]]` entry); context manager
- `send_folder(paths_or_dir, port, *, called_ae, calling_ae, ...)` -> node.dicomnet.SendResult,
  `echo(port, ...)` -> status | None, dcmtk `storescu(...)` / `echoscu(...)` ->
  CompletedProcess
- `make_ct_series(out_dir, findings, *, n_slices=12, size=64, seed=0, slice_thickness=5.0,
  **tags)` -> PhantomInfo, `dciodvfy_errors(path)` -> list of "Error" lines
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def receiver_parts(tmp_path: Path, *, start: bool = True):
    """An in-process `node.receiver.Receiver` on a fresh database and spool under `tmp_path`
    (port 0, no disk watermark): yields (receiver, store, config); stops and disposes after."""
    from node.config import config_from_dict
    from node.receiver import Receiver
    from storage import Database, Spool, Store

    cfg = config_from_dict(
        {
            "network": {"port": 0},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk": "0"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store = Store(db)
    receiver = Receiver(cfg, store, Spool(cfg.spool_dir))
    if start:
        receiver.start()
    try:
        yield receiver, store, cfg
    finally:
        receiver.stop(timeout=5)
        db.dispose()


def wait_until(
    pred: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition"
) -> T:
    """Poll `pred` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer for config dicts (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        scalars = {
            k: v
            for k, v in d.items()
            if not isinstance(v, Mapping)
            and not (isinstance(v, list) and v and isinstance(v[0], Mapping))
        }
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                table(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], Mapping):
                for item in v:
                    lines.append(f"[[{name}]]")
                    for ik, iv in item.items():
                        lines.append(f"{ik} = {_toml_value(iv)}")
                    lines.append("")

    table("", data)
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def node_config(
    data_dir: Path,
    port: int,
    *,
    ae_title: str = "MOLRE",
    destinations: Sequence[Mapping[str, Any]] = (),
    quiet_time_s: float = 1.0,
    release_grace_s: float = 0.3,
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A test config dict: short quiet times, fast retries, min_slices low enough for phantoms.

    `sections` are merged in, e.g. `selection={"min_slices": 4}`, `model={"isolation": "thread"}`.
    """
    cfg: dict[str, Any] = {
        "network": {"ae_title": ae_title, "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(data_dir), "min_free_disk": "0"},
        "assembler": {
            "quiet_time_s": quiet_time_s,
            "release_grace_s": release_grace_s,
            "poll_interval_s": 0.2,
        },
        "selection": {"min_slices": 8},
        "retry": {
            "max_attempts": 2,
            "job_retry_delay_s": 0.5,
            "export_backoff_base_s": 0.5,
            "export_backoff_max_s": 2.0,
        },
        "logging": {"json": True, "level": "INFO"},
        # the dashboard is on by default (port 8470): off in tests unless a test asks for it
        "dashboard": {"port": 0},
    }
    if destinations:
        cfg["destinations"] = [dict(d) for d in destinations]
    return _merge(cfg, sections)


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# DICOM clients
# ---------------------------------------------------------------------------------------------


def echo(
    port: int,
    called_ae: str = "MOLRE",
    calling_ae: str = "TESTSCU",
    host: str = "127.0.0.1",
    ssl_context: Any = None,
    timeout: float = 5.0,
) -> int | None:
    """C-ECHO status (0 = success) or None if no association could be made."""
    from node.dicomnet import echo as _echo

    return _echo(
        host, port, called_ae, calling_ae=calling_ae, ssl_context=ssl_context, timeout=timeout
    )


def dicom_files(folder_or_paths: Path | str | Iterable[Path | str]) -> list[Path]:
    """Sorted DICOM-ish files of a folder (recursive) or the given paths as a list."""
    if isinstance(folder_or_paths, (str, Path)):
        p = Path(folder_or_paths)
        if p.is_file():
            return [p]
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [Path(f) for f in folder_or_paths]


def send_folder(
    folder_or_paths: Path | str | Iterable[Path | str],
    port: int,
    *,
    called_ae: str = "MOLRE",
    calling_ae: str = "TESTSCU",
    host: str = "127.0.0.1",
    ssl_context: Any = None,
    timeout: float = 60.0,
):
    """Send files with pynetdicom over one association; returns node.dicomnet.SendResult.

    Raises node.dicomnet.AssociationError when the association is rejected/unreachable.
    """
    from node.dicomnet import send_files

    return send_files(
        dicom_files(folder_or_paths),
        host,
        port,
        called_ae,
        calling_ae=calling_ae,
        ssl_context=ssl_context,
        timeout=timeout,
    )


#: Debian's dcmtk leaves Nagle's algorithm on unless TCP_NODELAY=1: ~40 ms stall per instance.
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


@functools.lru_cache(maxsize=None)
def dcmtk_tool(name: str) -> str:
    """Absolute path of a *dcmtk* command-line tool (storescu, echoscu, storescp, dcmcjpeg...).

    Why not `shutil.which`: pynetdicom installs console scripts with the same names (storescu,
    storescp, echoscu, findscu...) into the virtualenv's bin, which comes first on PATH when
    the venv is active; those are slow Python re-implementations with different options.
    We take the first candidate whose `--version` output names dcmtk/OFFIS.
    """
    candidates = [str(Path(d) / name) for d in DCMTK_DIRS]
    found = shutil.which(name)
    if found:
        candidates.append(found)
    for cand in candidates:
        if not os.access(cand, os.X_OK):
            continue
        try:
            out = subprocess.run([cand, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (out.stdout + out.stderr).lower()
        if "dcmtk" in text or "offis" in text:
            return cand
    raise FileNotFoundError(
        f"dcmtk tool {name} not found (apt-get install dcmtk); note that "
        "pynetdicom's same-named scripts in the virtualenv do not count"
    )


def storescu(
    folder_or_paths: Path | str | Iterable[Path | str],
    port: int,
    *,
    called_ae: str = "MOLRE",
    calling_ae: str = "DCMTKSCU",
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """dcmtk storescu; `-R` proposes only the contexts the files need (their own transfer
    syntaxes), so compressed files go out compressed."""
    files = dicom_files(folder_or_paths)
    cmd = [
        dcmtk_tool("storescu"),
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-R",
        *extra_args,
        host,
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def echoscu(
    port: int,
    *,
    called_ae: str = "MOLRE",
    calling_ae: str = "DCMTKSCU",
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    """dcmtk echoscu; returncode 0 = C-ECHO succeeded."""
    cmd = [dcmtk_tool("echoscu"), "-aet", calling_ae, "-aec", called_ae, host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


# ---------------------------------------------------------------------------------------------
# a storage SCP that collects results
# ---------------------------------------------------------------------------------------------


class StorageSCP:
    """A C-STORE SCP in a background thread that keeps what it receives (a result destination).

    `received` holds the datasets (decoded, file_meta attached); `statuses` lets a test make the
    SCP answer failures: set `fail_next = n` to answer 0xA700 to the next n C-STOREs.
    `store_dir` (optional) also writes each object as `<SOPInstanceUID>.dcm`.
    """

    def __init__(
        self,
        ae_title: str = "TESTSCP",
        port: int | None = None,
        host: str = "127.0.0.1",
        store_dir: Path | None = None,
        ssl_context: Any = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port or free_port()
        self.store_dir = Path(store_dir) if store_dir else None
        self.ssl_context = ssl_context
        self.received: list[Dataset] = []
        self.calling_aes: list[str] = []
        self.fail_next = 0
        self._lock = threading.Lock()
        self._server = None
        self._ae = None

    def _on_store(self, event) -> int:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 0xA700
        ds = event.dataset
        ds.file_meta = event.file_meta
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(self.store_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(ds)
            self.calling_aes.append(event.assoc.requestor.ae_title)
        return 0x0000

    def start(self) -> "StorageSCP":
        from pynetdicom import evt

        from node.dicomnet import make_ae, scp_contexts

        ae = make_ae(self.ae_title)
        ae.supported_contexts = scp_contexts()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda e: 0x0000)]
        self._ae = ae
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def wait_for(self, count: int = 1, timeout: float = 60.0) -> list[Dataset]:
        """Block until at least `count` objects arrived; returns a copy of the list."""
        wait_until(
            lambda: len(self.received) >= count,
            timeout,
            what=f"{count} object(s) at {self.ae_title}",
        )
        with self._lock:
            return list(self.received)

    def destination(self, name: str = "pacs") -> dict[str, Any]:
        """The `[[destinations]]` entry pointing at this SCP."""
        return {"name": name, "ae_title": self.ae_title, "host": self.host, "port": self.port}

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# the node as a subprocess
# ---------------------------------------------------------------------------------------------


_STARTED: list["NodeProcess"] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that crashed before stopping its node must not leave it running."""
    for node in _STARTED:
        if node.proc is not None and node.proc.poll() is None:
            node.kill()


class NodeProcess:
    """`molre-node serve` as a subprocess on a loopback port.

    Create with `NodeProcess.create(tmp_path, destinations=[scp.destination()], ...)` (writes a
    config from `node_config`) or `NodeProcess(config_path, port=..., data_dir=...)` for a config
    you wrote yourself. stdout+stderr go to `<data_dir>/../node-<n>.log` (appended across
    restarts) so a failing test can show it.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        port: int,
        data_dir: Path,
        ae_title: str = "MOLRE",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        calling_ae: str = "TESTSCU",
        database_url: str | None = None,
    ) -> None:
        self.calling_ae = calling_ae  # used by wait_ready's C-ECHO and send()
        self._database_url = database_url  # None = the SQLite file in data_dir
        self.config_path = Path(config_path)
        self.port = port
        self.data_dir = Path(data_dir)
        self.ae_title = ae_title
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.config_path.with_suffix(".log")
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def create(
        cls,
        tmp_dir: Path,
        *,
        port: int | None = None,
        ae_title: str = "MOLRE",
        env: Mapping[str, str] | None = None,
        calling_ae: str = "TESTSCU",
        database_url: str | None = None,
        data_dir: Path | None = None,
        config_name: str = "node.toml",
        **config: Any,
    ) -> "NodeProcess":
        """Write `<tmp_dir>/<config_name>` from `node_config(**config)` and return a (not
        started) NodeProcess for it. `database_url` (e.g. a PostgreSQL one) goes to
        `storage.database_url`; several nodes may share one `data_dir` (several-nodes
        topology: pass `node={"name": ..., "roles": [...]}` and distinct `config_name`s)."""
        tmp_dir = Path(tmp_dir)
        port = port or free_port()
        data_dir = Path(data_dir) if data_dir is not None else tmp_dir / "node-data"
        if database_url:
            config["storage"] = {**config.get("storage", {}), "database_url": database_url}
        data = node_config(data_dir, port, ae_title=ae_title, **config)
        path = write_config(tmp_dir / config_name, data)
        return cls(
            path,
            port=port,
            data_dir=data_dir,
            ae_title=ae_title,
            env=env,
            calling_ae=calling_ae,
            database_url=database_url,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 90.0) -> "NodeProcess":
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--config",
            str(self.config_path),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(REPO_ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _STARTED.append(self)
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def roles(self) -> list[str]:
        """The node's roles: `--roles` in extra_args, else `[node] roles` of its config."""
        import tomllib

        if "--roles" in self.extra_args:
            return self.extra_args[self.extra_args.index("--roles") + 1].split(",")
        cfg = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        return list(cfg.get("node", {}).get("roles", ["receive", "assemble", "infer", "dispatch"]))

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the node answers C-ECHO (a node without the receive role: until it logged
        'node started'); raises with the log tail if it died."""
        import logging

        deadline = time.monotonic() + timeout
        pnd = logging.getLogger("pynetdicom")
        level = pnd.level
        pnd.setLevel(logging.CRITICAL)  # "connection refused" while starting is expected
        try:
            self._wait_ready(deadline, timeout)
        finally:
            pnd.setLevel(level)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        listens = "receive" in self.roles
        starts = self.starts
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.proc.returncode} during start:\n{self.log_tail()}"
                )
            if not listens:
                started = sum(1 for r in self.log_records() if r.get("event") == "node started")
                if started >= starts:
                    return
                time.sleep(0.2)
                continue
            try:
                if echo(self.port, self.ae_title, calling_ae=self.calling_ae, timeout=2.0) == 0:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"node did not answer C-ECHO on port {self.port} within "
            f"{timeout:.0f} s:\n{self.log_tail()}"
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; returns the exit status (kills -9 after `timeout`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the node and its inference child(ren) (its whole process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            if self.proc.poll() is None:
                self.proc.kill()
        self.proc.wait(30)

    def _reap_group(self) -> None:
        # children (inference processes) of a node that exited must not outlive the test
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, wait: bool = True, timeout: float = 90.0) -> "NodeProcess":
        if self.alive:
            self.stop()
        return self.start(wait=wait, timeout=timeout)

    def __enter__(self) -> "NodeProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.alive:
            self.stop(timeout=30)
        elif self.proc is not None:
            self._reap_group()

    # -- inspection ------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (non-JSON lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    @property
    def database_url(self) -> str:
        if self._database_url:
            return self._database_url
        return f"sqlite:///{(self.data_dir / 'molre.db').resolve()}"

    def store(self):
        """A storage.Store on the node's database (for assertions; reads are safe while the
        node runs)."""
        from storage import Database, Store

        return Store(Database(self.database_url))

    def send(self, folder_or_paths: Any, calling_ae: str | None = None, **kw: Any):
        """send_folder to this node (calling AE defaults to `self.calling_ae`)."""
        return send_folder(
            folder_or_paths,
            self.port,
            called_ae=self.ae_title,
            calling_ae=calling_ae or self.calling_ae,
            **kw,
        )

    def wait_series_state(self, series_uid: str, states: Iterable[str], timeout: float = 120.0):
        """Wait until the series reaches one of `states`; returns the SeriesRecord."""
        wanted = {str(s) for s in states}
        store = self.store()

        def check():
            if not self.alive and self.proc is not None:
                raise RuntimeError(f"node died:\n{self.log_tail()}")
            try:
                rec = store.get_series(series_uid)
            except Exception:  # noqa: BLE001 - not there yet
                return None
            state = getattr(rec.state, "value", rec.state)
            return rec if str(state) in wanted else None

        try:
            return wait_until(
                check, timeout, interval=0.3, what=f"series {series_uid} in {sorted(wanted)}"
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None


# ---------------------------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------------------------


def make_ct_series(
    out_dir: Path,
    findings: Sequence[str] = (),
    *,
    n_slices: int = 12,
    size: int = 64,
    seed: int = 0,
    slice_thickness: float = 5.0,
    **tags: Any,
):
    """A synthetic head-CT phantom series (real CT DICOM files, one per slice).

    Returns molre.data.synth.PhantomInfo (uids, paths, planted findings).
    """
    import numpy as np

    from molre.data.synth import write_phantom_series

    return write_phantom_series(
        Path(out_dir),
        np.random.default_rng(seed),
        list(findings),
        size=size,
        n_slices=n_slices,
        slice_thickness=slice_thickness,
        **tags,
    )


def sql(node: "NodeProcess", query: str, *args) -> list[tuple]:
    """Rows of `query` (`?` placeholders) on the node's audit database, SQLite or PostgreSQL."""
    if not node.database_url.startswith("sqlite:"):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        engine = create_engine(node.database_url, poolclass=NullPool)
        try:
            with engine.connect() as c:
                return [
                    tuple(r)
                    for r in c.exec_driver_sql(query.replace("?", "%s"), tuple(args)).fetchall()
                ]
        finally:
            engine.dispose()
    con = sqlite3.connect(f"file:{node.data_dir / 'molre.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def sr_for(scp: "StorageSCP", series_uid: str, node: "NodeProcess", timeout: float = 150):
    """The SR the node sent for `series_uid` (evidence references that series)."""

    def find():
        for ds in list(scp.received):
            if ds.Modality != "SR":
                continue
            for st in ds.CurrentRequestedProcedureEvidenceSequence:
                for se in st.ReferencedSeriesSequence:
                    if se.SeriesInstanceUID == series_uid:
                        return ds
        return None

    try:
        return wait_until(find, timeout, interval=0.3, what=f"SR for series {series_uid}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- node log ---\n{node.log_tail(40)}") from None


def sql_rows(cfg: Any, query: str, *args: Any) -> list[tuple]:
    """Rows of a query on the SQLite audit database of an in-process node config."""
    con = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"))
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def sr_presence(ds: Any, tmp: Path) -> dict[str, tuple[float, bool]]:
    """finding key -> (probability, Present?) of an SR the node sent (parsed with highdicom)."""
    import highdicom as hd

    path = Path(tmp) / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    return {
        g.tracking_identifier: (
            float(g.get_measurements()[0].value),
            g.get_qualitative_evaluations()[0].value.value == "52101004",
        )
        for g in groups
    }


def dciodvfy_errors(path: Path | str) -> list[str]:
    """Lines of `dciodvfy` output that report errors (empty list = valid)."""
    exe = shutil.which("dciodvfy")
    if not exe:
        raise FileNotFoundError("dciodvfy not found (apt-get install dicom3tools)")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    return [ln for ln in text.splitlines() if ln.startswith("Error")]


__all__ = [
    "NodeProcess",
    "StorageSCP",
    "dciodvfy_errors",
    "dicom_files",
    "echo",
    "echoscu",
    "free_port",
    "make_ct_series",
    "node_config",
    "send_folder",
    "sql",
    "sr_for",
    "sr_presence",
    "storescu",
    "to_toml",
    "wait_until",
    "write_config",
]
