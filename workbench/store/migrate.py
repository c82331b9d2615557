"""Bringing a store's schema to the version this code needs, when a Store opens it.

The schema's version is Alembic's (the `alembic_version` table; migrations in
workbench/store/migrations/versions). Opening only reads it; when it is behind, the upgrade runs in one
transaction under a lock that serializes concurrent openers: SQLite's write lock (BEGIN IMMEDIATE),
a PostgreSQL advisory lock. The version is read again under the lock (another process may have upgraded
meanwhile). A SQLite database made before Alembic (PRAGMA user_version 0 or 1, no alembic_version table)
is upgraded in place by migration 0001.
"""
from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ADVISORY_KEY = 0x4853_4157_4231  # "HSAWB1": the PostgreSQL advisory lock of schema upgrades


class SchemaTooNew(RuntimeError):
    """The database's schema is a version this code does not know (made by a newer workbench)."""


def _config():
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@functools.lru_cache(maxsize=1)
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The schema version this code writes."""
    return _script().get_current_head()


def current(connection) -> str | None:
    """The schema version of the database (None: empty, or made before migrations)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def behind(connection) -> bool:
    revision = current(connection)
    if revision == head():
        return False
    if revision is not None:
        try:
            known = _script().get_revision(revision)
        except Exception:  # noqa: BLE001 - alembic raises ResolutionError / CommandError
            known = None
        if known is None:
            raise SchemaTooNew(f"its schema version {revision!r} is newer than this workbench knows "
                               f"(it knows up to {head()!r}): use a newer workbench")
    return True


def upgrade(write_connection) -> bool:
    """Upgrade to head if behind, on `write_connection`: a connection whose transaction has begun and holds
    the database's write lock (SQLite: BEGIN IMMEDIATE). On PostgreSQL the advisory lock is taken here.
    Returns whether anything ran."""
    from alembic import command

    if write_connection.dialect.name == "postgresql":
        write_connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_KEY})
    if not behind(write_connection):
        return False  # another opener got there first
    config = _config()
    config.attributes["connection"] = write_connection
    command.upgrade(config, "head")
    return True
