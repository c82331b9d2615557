"""The one way this project writes to SQLite: a transaction that takes the write lock up front."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager


class DatabaseBusy(sqlite3.OperationalError):
    """Another connection held the write lock for the whole busy timeout."""


@contextmanager
def write_transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error). Taking the write lock before reading
    means a read-check-write sequence cannot interleave with another writer (connections must be
    opened with isolation_level=None, so that sqlite3 does not begin transactions by itself).
    DatabaseBusy when the lock stays taken for the connection's whole busy timeout."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise DatabaseBusy(str(e)) from None
        raise
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
