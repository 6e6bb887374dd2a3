"""Run the Alembic migrations that ship inside the package (no alembic.ini needed).

The script location is this package's ``migrations/`` folder, so an installed wheel migrates
exactly like a checkout. The migrations run on the caller's own engine (handed to env.py through
``Config.attributes['connection']``), which keeps the SQLite pragmas and ``BEGIN IMMEDIATE``:
several node processes starting together serialise on the write lock, and the later ones find
the schema already at head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from common.errors import MolreError
from common.log import get_logger

if TYPE_CHECKING:
    from storage.db import Database

log = get_logger("storage.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: PostgreSQL advisory lock key held while migrating ("molre" + "mig" in ASCII, any constant)
MIGRATION_LOCK_KEY = 0x6D6F6C72656D6967


def alembic_config(db: Database) -> Config:
    """An in-memory Alembic config pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this version of molre-node."""
    head = ScriptDirectory.from_config(_bare()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def _bare() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def current_revision(db: Database) -> str | None:
    """Revision stored in the database's ``alembic_version`` table (None = empty database)."""
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default head). Idempotent."""
    before = current_revision(db)
    known = {s.revision for s in ScriptDirectory.from_config(_bare()).walk_revisions()}
    if before is not None and before not in known:
        raise MolreError(
            f"the database {db!r} is at schema revision {before!r}, which this molre-node "
            f"version does not know (newest it knows: {head_revision()!r}); upgrade molre-node "
            "or point database_url at another database"
        )
    cfg = alembic_config(db)
    with db.engine.connect() as conn:
        locked = db.dialect == "postgresql"
        if locked:
            # PostgreSQL: nodes starting together on an empty database would each create the
            # tables / insert into alembic_version (UniqueViolation). A session-level advisory
            # lock serialises them; the later ones find the schema at head and do nothing.
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        finally:
            if locked:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()
    after = current_revision(db)
    if after != before:
        log.info(
            "database schema migrated", database=repr(db), from_revision=before, to_revision=after
        )
