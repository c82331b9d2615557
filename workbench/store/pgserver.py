"""A throw-away PostgreSQL server for tests and benchmarks: `initdb` into a temporary folder, `pg_ctl start`
on a Unix socket in that folder (and optionally a loopback port), `stop()` removes it all.

    with PostgresServer() as server:
        url = server.create_database("t1")        # postgresql+psycopg://...?host=SOCKET_DIR&port=N
        store = Store(url, image_dir=...)

PostgreSQL refuses to run as root: as root the server runs as the `postgres` user (Debian's package makes
it; `user=` names another), whose folder it gets. The binaries are found on PATH (`pg_ctl`) or under
/usr/lib/postgresql/<version>/bin (Debian's layout, newest version first); PostgresNotFound says what to
install. `durable=False` (tests) turns fsync and synchronous commit off: data survives a crash of a client
process but not of the machine, which nothing here needs; benchmarks keep the defaults (durable=True).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = ("install PostgreSQL (Debian: apt-get install postgresql; scripts/test.sh does it when run as "
                "root) or put its bin folder (initdb, pg_ctl) on PATH")


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) on this machine."""


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: $PG_BINDIR, then PATH, then the newest
    /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(path: str):
        found = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/", path)
        return (int(found.group(1)), int(found.group(2) or 0)) if found else (0, 0)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PostgresNotFound(f"no PostgreSQL server binaries (initdb, pg_ctl) found: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, reachable by a Unix socket there (and by
    127.0.0.1:`port` when `tcp`). Superuser: `user` (passwordless, trust authentication: the socket
    folder is private to the server's user and root)."""

    def __init__(self, *, durable: bool = False, tcp: bool = False, user: str | None = None,
                 max_connections: int = 300, settings: dict | None = None):
        self.bindir = find_bindir()
        self.durable, self.tcp, self.max_connections = durable, tcp, max_connections
        self.settings = dict(settings or {})
        self.as_root = os.geteuid() == 0
        if self.as_root:
            import pwd

            self.user = user or "postgres"
            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                raise PostgresNotFound(f"PostgreSQL refuses to run as root and there is no user {self.user!r} to run "
                                       f"it as: {INSTALL_HINT} (Debian's package makes the user postgres)") from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        else:
            import getpass

            self.user = getpass.getuser()
        self.port = free_port()
        self.root: Path | None = None
        self.started = False

    # --- running commands as the server's user ---------------------------------------------------

    def _run(self, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self.as_root:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/",
                              env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-2000:]}")
        return done

    @property
    def socket_dir(self) -> Path:
        return self.root / "s"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self) -> "PostgresServer":
        # A short path: the socket's full name must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="hsa-pg-", dir="/tmp"))
        self.socket_dir.mkdir()
        if self.as_root:
            for path in (self.root, self.socket_dir):
                os.chown(path, self._uid, self._gid)
        os.chmod(self.root, 0o700)
        self._run(self.bindir / "initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-instructions", *([] if self.durable else ["--no-sync"]))
        options = {
            "listen_addresses": "'127.0.0.1'" if self.tcp else "''",
            "port": self.port,
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": self.max_connections,
            "shared_buffers": "'128MB'",
            "log_min_messages": "warning",
        }
        if not self.durable:
            options.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        options.update(self.settings)
        with open(self.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in options.items())
        if self.as_root:
            os.chown(self.data_dir / "postgresql.auto.conf", self._uid, self._gid)
        self._run(self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self.root / "server.log", "-w", "-t", "60",
                  "start")
        self.started = True
        return self

    def stop(self) -> None:
        """Stop the server now (immediate mode: nothing here needs a clean shutdown) and remove its folder."""
        if self.root is None:
            return
        if self.started:
            done = self._run(self.bindir / "pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "-t", "30",
                             "stop", check=False)
            if done.returncode != 0:  # last resort: the postmaster's pid from its pid file
                try:
                    pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "PostgresServer":
        return self.start() if not self.started else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- databases ---------------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL for `database` (over the Unix socket, or TCP when the server listens there)."""
        if self.tcp:
            return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"
        return f"{driver}://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"

    def connect(self, database: str = "postgres"):
        """A psycopg connection in autocommit mode (CREATE / DROP DATABASE run outside transactions)."""
        import psycopg

        if self.tcp:
            return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database,
                                   autocommit=True)
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=self.user, dbname=database,
                               autocommit=True)

    def create_database(self, name: str, *, template: str = "template0") -> str:
        """Create database `name` (a fresh copy of `template`); returns its URL."""
        _check_name(name)
        with self.connect() as db:
            db.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_check_name(template)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, ending its connections (WITH (FORCE): a client that did not close is cut off)."""
        _check_name(name)
        with self.connect() as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name

