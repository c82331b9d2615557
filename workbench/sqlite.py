"""The one way this project writes to SQLite: a transaction that takes the write lock up front."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager


@contextmanager
def write_transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error). Taking the write lock before reading
    means a read-check-write sequence cannot interleave with another writer (connections must be
    opened with isolation_level=None, so that sqlite3 does not begin transactions by itself)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
