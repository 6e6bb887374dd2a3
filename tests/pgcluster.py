"""A throw-away PostgreSQL cluster for the tests (one per pytest session).

Why a cluster of our own: the tests must talk to a real PostgreSQL server (the node's multi-node
topology only works there), but never to the network or to a server somebody else owns. So the
session starts Debian's PostgreSQL binaries (``apt-get install postgresql``; found under
``/usr/lib/postgresql/<major>/bin`` or via ``pg_config --bindir``) on ``127.0.0.1`` and a free
port, with its data and socket directories in a temporary directory, and removes it at the end.
PostgreSQL refuses to run as root: a root test run starts it as the ``postgres`` system user (the
Debian package creates it), owning the temporary directory.

Selection (environment):

- ``MOLRE_TEST_PG=off``: PostgreSQL variants are skipped.
- ``MOLRE_TEST_PG=required`` (``.ci/run`` sets it): a missing server is an error, not a skip.
- ``MOLRE_TEST_PG_URL=postgresql://user:pw@host:port/postgres``: use that server instead of
  starting one (the user must be allowed to CREATE DATABASE).

Every test that needs PostgreSQL gets a fresh database (:meth:`PgServer.create_database`,
optionally copied from a migrated template: ``CREATE DATABASE … TEMPLATE``), dropped afterwards.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

_counter = itertools.count(1)


def _bindir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out) if (Path(out) / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    """A reachable PostgreSQL server: ``admin_url`` may create and drop databases."""

    admin_url: str
    owned_dir: Path | None = None
    _stop: list[str] = field(default_factory=list)
    _run_as: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def _admin(self):
        return create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def create_database(self, template: str | None = None, name: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); returns its URL."""
        name = name or f"t{os.getpid()}_{next(_counter)}"
        engine = self._admin()
        try:
            with engine.connect() as c:
                c.execute(
                    text(
                        f'CREATE DATABASE "{name}"'
                        + (f' TEMPLATE "{template}"' if template else "")
                    )
                )
        finally:
            engine.dispose()
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        name = make_url(url_or_name).database if "://" in url_or_name else url_or_name
        engine = self._admin()
        try:
            with engine.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()

    def stop(self) -> None:
        if self._stop:
            subprocess.run(self._run_as + self._stop, capture_output=True, timeout=60)
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


def start_server() -> PgServer:
    """Start a throw-away cluster (or wrap ``MOLRE_TEST_PG_URL``); raises RuntimeError with the
    reason when that is not possible."""
    external = os.environ.get("MOLRE_TEST_PG_URL")
    if external:
        url = make_url(external)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        return PgServer(url.render_as_string(hide_password=False))
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("psycopg is not installed (pip install 'psycopg[binary]')") from exc
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError(
                "running as root and there is no 'postgres' user to start PostgreSQL as"
            ) from exc
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="molre-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, sock, logf = root / "data", root / "sock", root / "server.log"
    port = _free_port()
    env = dict(os.environ, LC_ALL="C", LANG="C")

    def run(*cmd: str, timeout: float = 120) -> None:
        r = subprocess.run(
            run_as + list(cmd), capture_output=True, text=True, env=env, timeout=timeout, cwd=root
        )
        if r.returncode != 0:
            log = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(
                f"{Path(cmd[0]).name} failed ({r.returncode}): "
                f"{(r.stderr or r.stdout)[-2000:]} {log}"
            )

    run("mkdir", "-p", str(sock))
    run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "molre",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-sync",
        "--no-instructions",
    )
    # fsync off: a test cluster needs no durability; many connections: several nodes at once
    opts = (
        f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(logf),
        "-o",
        opts,
        "-w",
        "-t",
        "60",
        "start",
    )
    server = PgServer(
        f"postgresql+psycopg://molre@127.0.0.1:{port}/postgres",
        owned_dir=root,
        _stop=[str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
        _run_as=run_as,
    )
    return server


def mode() -> str:
    """'off' | 'required' | 'auto' (MOLRE_TEST_PG)."""
    value = os.environ.get("MOLRE_TEST_PG", "auto").strip().lower()
    return value if value in ("off", "required") else "auto"
