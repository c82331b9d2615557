"""Which files on the server a request may name (issue 19.7): one rule for every tab.

A workbench that only this machine can reach (127.0.0.1, no share link, no login) opens whatever its
user names: they are on their own machine. Once others can reach it (`--share`, a `--host` that is not
loopback, `--auth`), a path typed into a form (a dataset, a base model, a database) must lie in the
workspace or in a folder the operator named at start (`python app.py --allow-path DIR`), after links
and `..` are resolved. The embedded models (by name or folder) and Hugging Face hub ids stay allowed:
a hub id names a model on the hub, not a file here.

    rule = PathRule(workspace, allowed=(Path("/data"),), confined=True)
    rule.path("shapes.json", "dataset")                  # WORKSPACE/shapes.json
    rule.path("/etc/passwd", "dataset")                  # PathRefused
    rule.model("Qwen/Qwen2.5-VL-3B-Instruct")            # a hub id, as given
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub's repo ids: "name" or "owner/name", letters, digits, '-', '_', '.'; no '--' or '..'
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
DATABASE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # sqlite:///PATH, postgresql://USER@HOST/DB, ...


class PathRefused(ValueError):
    """A path outside what this server may read; the message names the field and the allowed folders."""


def reachable_by_others(host: str, *, share: bool = False, auth: bool = False) -> bool:
    """Whether people other than this machine's user can send requests: a share link, a login (which
    only makes sense for others), or an address that is not loopback (0.0.0.0, a LAN address, a name)."""
    if share or auth:
        return True
    if host.strip().lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return True


def is_database_url(value) -> bool:
    """A database URL (the annotation store's --db: sqlite:///PATH, postgresql://...), not a file path."""
    return isinstance(value, str) and bool(DATABASE_URL.match(value.strip()))


def sqlite_url_path(value: str) -> str | None:
    """The file a sqlite:/// URL names (SQLAlchemy's form: sqlite:///relative, sqlite:////absolute), or None."""
    text = value.strip()
    if not text.lower().startswith("sqlite:///"):
        return None
    return text[len("sqlite:///"):].split("?", 1)[0]


def is_hub_id(value: str) -> bool:
    """Looks like a Hugging Face repo id ('owner/name' or 'name'), not like a path."""
    return bool(HUB_ID.fullmatch(value)) and ".." not in value and "--" not in value


@dataclass(frozen=True)
class PathRule:
    workspace: Path
    allowed: tuple[Path, ...] = ()  # more folders (or files) the operator named: --allow-path, --db, ...
    confined: bool = False  # True when others can reach the server
    databases: tuple[str, ...] = ()  # database URLs the operator named (--db postgresql://...)
    models: tuple[Path, ...] = ()  # model folders always allowed: the embedded models, --default-model

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser().resolve() for p in (self.workspace, *self.allowed))

    def path(self, value: str | Path, what: str = "path") -> Path | str:
        """`value` resolved (relative to the workspace, links followed); refused when the server is
        reachable by others and it lies outside the workspace and the allowed folders. A database URL
        (an annotation store: `store_db`) is checked by `database` and returned as a string."""
        text = str(value).strip()
        if not text or "\0" in text:
            raise PathRefused(f"{what}: not a path: {text!r}")
        if isinstance(value, str) and is_database_url(text):
            return self.database(text, what)
        resolved = (Path(self.workspace) / Path(text).expanduser()).resolve()
        if self.confined and not any(resolved.is_relative_to(root) for root in self.roots):
            raise PathRefused(f"{what} {text!r} is outside the workspace{self._and_allowed()}: this server is "
                              "reachable by others, so it reads files there only (python app.py --allow-path DIR "
                              "allows another folder)")
        return resolved

    def database(self, value: str, what: str = "store_db") -> str:
        """A database URL as given, when this server may open it: a SQLite file (sqlite:///PATH) by the
        rule for paths, its file and its ?image_dir=; any other database (PostgreSQL) when the server is
        reachable by this machine's user only, or it is one the operator named (`databases`): a form
        cannot make a shared server connect to another database server."""
        text = str(value).strip()
        file = sqlite_url_path(text)
        if file is not None:
            self.path(file or ".", what)
            folder = re.search(r"[?&]image_dir=([^&]*)", text)
            if folder:
                from urllib.parse import unquote

                self.path(unquote(folder.group(1)), what)
            return text
        if self.confined and text not in self.databases:
            raise PathRefused(f"{what}: this server is reachable by others, so it opens the annotation database it "
                              "was started with only (python app.py --db URL), not another one a form names")
        return text

    def model(self, value: str, what: str = "base_model") -> str:
        """A model to load: an embedded model's name or folder, a hub id (both as given), or a path that
        `path` allows (resolved). A name that exists in the workspace is that folder, not a hub id; on a
        confined server so is a name that exists in the server's current folder (transformers would load
        that folder rather than the hub's model), which `path` then resolves in the workspace."""
        from models.zoo import EMBEDDED

        text = str(value).strip()
        if text in EMBEDDED:
            return text
        local = (Path(self.workspace) / Path(text).expanduser()).resolve() if text and "\0" not in text else None
        if local is not None and any(local == Path(m).resolve() or local.is_relative_to(Path(m).resolve())
                                     for m in (*EMBEDDED.values(), *self.models)):
            return str(local)
        if is_hub_id(text) and not (Path(self.workspace) / text).exists() and not (self.confined and Path(text).exists()):
            return text
        return str(self.path(text, what))

    def _and_allowed(self) -> str:
        workspace, *others = self.roots
        extra = [str(p) for p in others if not p.is_relative_to(workspace)]
        return f" ({workspace}) and the allowed folders ({', '.join(extra)})" if extra else f" ({workspace})"
