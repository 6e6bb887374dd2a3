"""Alembic environment for molre-node's audit database.

Normally run through ``storage.migrate.upgrade`` (which passes its own connection in
``config.attributes['connection']``); also works with the ``alembic`` command and a URL in
``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    # transactional_ddl: Alembic would otherwise run SQLite migrations one transaction each,
    # and two node processes starting together could interleave (both decide to apply 0002).
    # One transaction (BEGIN IMMEDIATE on SQLite) makes the whole upgrade atomic and serialised.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``) for DBAs who apply DDL by hand."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from storage.db import Database

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic: set sqlalchemy.url (or pass a connection)")
    db = Database(url)
    with db.engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
