"""Where the annotation store lives, and the connection to it: a SQLite file or a PostgreSQL database.

A location is a path (a SQLite file, as before), a `sqlite:///PATH` URL, or a `postgresql://USER@HOST/DB`
URL (also `postgres://`, `postgresql+psycopg://`; the driver is always psycopg 3). A URL may end with
`?image_dir=/abs/folder`: where the store keeps its image files (a SQLite store's default is the `images`
folder beside its file; a PostgreSQL store's is $WORKBENCH_IMAGES, else the app's default workspace/images).
Passwords belong in ~/.pgpass or $PGPASSWORD rather than in a URL: a URL travels into run configs.

SQLite connections keep the store's pragmas (WAL, `synchronous`, foreign keys, the busy timeout), and
a write transaction is BEGIN IMMEDIATE (the write lock up front, so a read-check-write cannot interleave).
PostgreSQL connections wait at most the busy timeout for a lock (`lock_timeout`); read-check-write
sequences lock the rows they check (SELECT ... FOR UPDATE), see workbench.store.db.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.types import Text, TypeDecorator

from workbench.paths import is_database_url

POSTGRES_SCHEMES = ("postgresql", "postgres")
DRIVER = "postgresql+psycopg"


class LocationError(ValueError):
    """A database location that cannot be used (unknown scheme, no database name, ...)."""


def is_url(value) -> bool:
    """Whether `value` is a database URL rather than a file path."""
    return is_database_url(value)


def default_image_dir() -> Path:
    """Images of a store whose location does not say (PostgreSQL): $WORKBENCH_IMAGES, else the app's
    default workspace's images folder (beside the default SQLite database)."""
    if os.environ.get("WORKBENCH_IMAGES"):
        return Path(os.environ["WORKBENCH_IMAGES"]).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "workspace" / "images"


@dataclass(frozen=True)
class Location:
    url: URL                    # what SQLAlchemy connects to (image_dir taken out)
    path: Path | None = None    # the SQLite file; None for PostgreSQL
    image_dir: Path | None = None  # from the URL's ?image_dir=, if given

    @property
    def kind(self) -> str:
        return "sqlite" if self.path is not None else "postgresql"

    @property
    def display(self) -> str:
        """How messages name the database: the file's name, or the URL without its password."""
        if self.path is not None:
            return self.path.name
        return self.url.set(drivername="postgresql").render_as_string(hide_password=True)

    @property
    def identity(self) -> str:
        """The same string for the same database, whatever the spelling (names import markers)."""
        if self.path is not None:
            return str(self.path.resolve())
        u = self.url
        return f"postgresql://{u.username or ''}@{u.host or ''}:{u.port or ''}/{u.database}?" + \
            "&".join(f"{k}={v}" for k, v in sorted(u.query.items()) if k in ("host", "port"))

    def as_string(self, *, image_dir: Path | None = None) -> str:
        """The location as one string another process can open (a SQLite file's path as a plain path,
        as before; a URL with its image_dir)."""
        if self.path is not None:
            return str(self.path)
        url = self.url
        folder = image_dir or self.image_dir
        if folder is not None:
            url = url.update_query_dict({"image_dir": str(folder)})
        return url.render_as_string(hide_password=False)


def locate(value) -> Location:
    """The Location of a path or URL (see the module's doc)."""
    if isinstance(value, Location):
        return value
    if isinstance(value, os.PathLike) or not is_url(value):
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str) or not text.strip() or "\x00" in text:
            raise LocationError(f"not a database path or URL: {value!r}")
        path = Path(text).expanduser().resolve()
        return Location(URL.create("sqlite", database=str(path)), path)
    try:
        url = make_url(value.strip())
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises ArgumentError and ValueError here
        raise LocationError(f"not a database URL: {_hide_password(value)} ({e})") from None
    image_dir = url.query.get("image_dir")
    if isinstance(image_dir, tuple):
        image_dir = image_dir[-1]
    url = url.difference_update_query(["image_dir"])
    folder = Path(image_dir).expanduser().resolve() if image_dir else None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            raise LocationError("a SQLite store needs a file: sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = Path(url.database).expanduser().resolve()
        return Location(URL.create("sqlite", database=str(path), query=url.query), path, folder)
    if backend in POSTGRES_SCHEMES:
        if not url.database:
            raise LocationError(f"the URL names no database: {_hide_password(value)} "
                                "(postgresql://USER@HOST/DATABASE)")
        return Location(url.set(drivername=DRIVER), None, folder)
    raise LocationError(f"unsupported database {backend!r} in {_hide_password(value)}: use a file path, "
                        "sqlite:///PATH or postgresql://USER@HOST/DATABASE")


def _hide_password(value: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(value))


def create_engine(location: Location, *, synchronous: str = "FULL", busy_timeout_s: float = 30.0,
                  pool_size: int = 5, max_overflow: int = 20) -> sa.Engine:
    """A SQLAlchemy engine for the store at `location` (see the module's doc for what each connection sets)."""
    if location.kind == "sqlite":
        engine = sa.create_engine(location.url, poolclass=sa.pool.QueuePool, pool_size=pool_size,
                                  max_overflow=-1,  # SQLite connections are cheap: one per thread that needs one
                                  connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # transactions are ours (the "begin" event below)
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={synchronous}")
                cursor.execute("PRAGMA foreign_keys=ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            write = connection.get_execution_options().get("store_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    timeout_ms = max(1, int(busy_timeout_s * 1000))
    return sa.create_engine(
        location.url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=busy_timeout_s, pool_pre_ping=True,
        connect_args={"connect_timeout": max(2, min(30, int(busy_timeout_s) or 2)),
                      "application_name": "hsa-workbench",
                      "options": f"-c lock_timeout={timeout_ms} -c idle_in_transaction_session_timeout=600000"})


class SafeText(TypeDecorator):
    """TEXT that may hold any Python string: PostgreSQL's text cannot hold U+0000, so there a value with
    one (or one starting with the marker U+0001) is stored as U+0001 + its JSON; SQLite stores it as is.
    Only turn texts need this (records may carry NUL characters); names are refused with one instead."""

    impl = Text
    cache_ok = True
    MARK = "\x01"

    def process_bind_param(self, value, dialect):
        if dialect.name == "postgresql" and isinstance(value, str) and ("\x00" in value or value.startswith(self.MARK)):
            return self.MARK + json.dumps(value)
        return value

    def process_result_value(self, value, dialect):
        return decode_text(value) if dialect.name == "postgresql" else value


def decode_text(value):
    """A SafeText value as stored by PostgreSQL, back to the string (a cut one, as previews read, as well
    as can be)."""
    if isinstance(value, str) and value.startswith(SafeText.MARK):
        try:
            return json.loads(value[1:])
        except ValueError:
            return value[2:].replace("\\u0000", "\x00")
    return value
