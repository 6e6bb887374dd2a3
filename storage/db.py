"""Engine and sessions for the audit database (SQLite by default, PostgreSQL by URL).

Why the SQLite set-up looks the way it does: the receiver, the worker and the dispatcher write to
one SQLite file at the same time, from threads and from separate processes. With SQLite's default
*deferred* transactions, two connections can both start reading and then both try to upgrade to
a write lock; SQLite cannot wait in that case and fails at once with "database is locked",
whatever the busy timeout. So pysqlite's own transaction handling is switched off
(``isolation_level = None``) and SQLAlchemy's ``begin`` event emits ``BEGIN IMMEDIATE`` for write
sessions (the pattern from SQLAlchemy's pysqlite documentation): the write lock is taken up front,
where the busy timeout makes writers queue instead of failing. WAL lets readers proceed while one
writer works; ``synchronous`` is FULL by default (a commit survives a power cut); the node itself
uses NORMAL because its spool files are the durable source of truth (see :class:`Database`).

All timestamps are stored as naive UTC (``UTCDateTime``) and come back timezone-aware, so SQLite
and PostgreSQL behave the same and users can compare columns to ``datetime('now')`` in sqlite3.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import DateTime, create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from common.errors import ConfigError
from common.log import get_logger

log = get_logger("storage.db")

_READ_ONLY_OPT = "molre_read_only"


def _enable_wal(cur, timeout_s: float) -> None:
    """Switch a file database to WAL, retrying while another process holds the lock.

    Changing the journal mode needs an exclusive lock, and SQLite can answer "database is
    locked" here *without* running the busy handler (e.g. while another connection is itself
    converting the file or recovering its WAL index): several processes opening a new database at
    once (the node's receivers, worker and dispatcher; ``upgrade`` from three processes) then fail
    at random. WAL is persistent, so only the first connection really changes anything; the
    others just have to wait their turn, up to the same busy timeout as everything else."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC (the only kind of datetime this package hands out)."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC, returns aware UTC. Naive input is taken as UTC already."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: D102 - SQLAlchemy hook
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):  # noqa: D102 - SQLAlchemy hook
        if value is None:
            return None
        if isinstance(value, str):  # raw SQL on SQLite may hand back text
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"(?i)\b(password=)[^&\s]*")


def mask_url(url: str | Path | None) -> str:
    """A database URL fit to print or log: the password (``user:***@host``, also a
    ``password=`` query parameter) replaced by ``***``; works on unparseable text too."""
    if url is None:
        return ""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", str(url)))


def normalise_url(url: str | Path) -> str:
    """Accept a URL or a bare file path; map ``postgresql://`` to the psycopg (v3) driver.

    A bare path (``/var/lib/molre/molre.db``) is what users type; psycopg 3 is the driver the
    ``postgres`` extra installs, while SQLAlchemy's default for ``postgresql://`` is psycopg2.
    """
    text = str(url).strip()
    if not text:
        raise ConfigError("database URL is empty: set database_url in the node config or pass --db")
    if "://" not in text:
        text = "sqlite:///" + str(Path(text).expanduser())
    try:
        parsed = make_url(text)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise ConfigError(
            f"database URL {mask_url(text)!r} is not valid; use "
            "sqlite:///path/to/molre.db or postgresql://user@host/dbname"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """One engine + session factory for a database URL.

    ``Database(url)`` with ``url`` = ``sqlite:///path.db`` (default kind; parent dirs are
    created), ``sqlite://`` (in-memory, one shared connection, for tests) or
    ``postgresql://user:pw@host/db`` (needs the ``postgres`` extra: ``pip install
    'molre-node[postgres]'``). Call :meth:`upgrade` once at start to create/migrate the schema.

    ``synchronous`` (SQLite only): FULL (default) fsyncs the WAL at every commit, so a committed
    row survives a power cut. NORMAL skips that fsync (a commit costs microseconds instead of a
    disk flush); it still survives a crash or ``kill -9`` of the process, but the last commits
    may be lost if the machine itself goes down. The node runs NORMAL: its spool file is the
    durable record of a received instance and ``node.receiver.reconcile_spool`` rebuilds rows
    lost that way at start-up (see docs/configuration.md, ``storage.durability``).

    Sessions: ``with db.session() as s:`` is one write transaction (``BEGIN IMMEDIATE`` on
    SQLite), committed on exit, rolled back on exception. ``db.session(write=False)`` is a read
    transaction (plain deferred ``BEGIN``) that does not block writers.
    """

    def __init__(
        self,
        url: str | Path,
        *,
        busy_timeout_s: float = 60.0,
        echo: bool = False,
        synchronous: str = "FULL",
    ) -> None:
        self.url = normalise_url(url)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError(f"SQLite synchronous={synchronous!r}: use FULL, NORMAL or EXTRA")
        self.synchronous = synchronous.upper()
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        #: SQLite in memory: one shared connection (StaticPool), no second connection to read on
        self.in_memory = self.dialect == "sqlite" and parsed.database in (None, "", ":memory:")
        self.busy_timeout_s = float(busy_timeout_s)
        if self.dialect == "sqlite":
            self.engine = self._sqlite_engine(parsed, echo)
        elif self.dialect == "postgresql":
            try:
                self.engine = create_engine(self.url, echo=echo, pool_pre_ping=True, future=True)
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"database URL uses PostgreSQL but its driver is missing ({exc.name}); "
                    "install it with: pip install 'molre-node[postgres]'"
                ) from exc
        else:
            raise ConfigError(
                f"database URL {mask_url(self.url)!r}: unsupported backend "
                f"{self.dialect!r}; use sqlite:/// or postgresql://"
            )
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False, future=True)
        self._read_engine = self.engine.execution_options(**{_READ_ONLY_OPT: True})
        self._read_sessions = sessionmaker(bind=self._read_engine, expire_on_commit=False)
        # Threads of one process queue here instead of polling SQLite's lock (cheaper, fair).
        self._write_lock = threading.RLock() if self.dialect == "sqlite" else None

    # -- engine set-up -------------------------------------------------------------------------
    def _sqlite_engine(self, parsed, echo: bool) -> Engine:
        database = parsed.database
        in_memory = database in (None, "", ":memory:")
        kwargs: dict = {
            "echo": echo,
            "future": True,
            "connect_args": {"timeout": self.busy_timeout_s, "check_same_thread": False},
        }
        if in_memory:
            kwargs["poolclass"] = StaticPool
        else:
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, **kwargs)
        busy_ms = int(self.busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):  # pragma: no cover - exercised via engine
            # SQLAlchemy (not pysqlite) decides when BEGIN is sent; see the module docstring.
            dbapi_connection.isolation_level = None
            cur = dbapi_connection.cursor()
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cur.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                _enable_wal(cur, self.busy_timeout_s)
                cur.execute(f"PRAGMA synchronous = {self.synchronous}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover - exercised via engine
            if conn.get_execution_options().get(_READ_ONLY_OPT):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    # -- sessions ------------------------------------------------------------------------------
    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any exception."""
        if write and self._write_lock is not None:
            with self._write_lock, self._sessions() as sess, sess.begin():
                yield sess
            return
        factory = self._sessions if write else self._read_sessions
        with factory() as sess, sess.begin():
            yield sess

    @contextmanager
    def connection(self, *, write: bool = True) -> Iterator[Connection]:
        """One Core transaction without an ORM session: for the receiver's per-instance hot path,
        where the ORM unit of work (identity map, flush ordering) costs more than the SQL.
        Same locking and commit/rollback rules as :meth:`session`."""
        if write and self._write_lock is not None:
            with self._write_lock, self.engine.connect() as conn, conn.begin():
                yield conn
            return
        engine = self.engine if write else self._read_engine
        with engine.connect() as conn, conn.begin():
            yield conn

    # -- schema --------------------------------------------------------------------------------
    def upgrade(self, revision: str = "head") -> None:
        """Create or migrate the schema with Alembic (idempotent; safe from several processes).

        Runs on this Database's own engine, so the SQLite pragmas and ``BEGIN IMMEDIATE`` apply
        and concurrent starters serialise instead of racing.
        """
        from storage.migrate import upgrade

        upgrade(self, revision)

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (None = never migrated)."""
        from storage.migrate import current_revision

        return current_revision(self)

    def dispose(self) -> None:
        """Close pooled connections (tests, and before fork in multi-process set-ups)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({mask_url(self.url)!r})"
