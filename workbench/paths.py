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


def is_hub_id(value: str) -> bool:
    """Looks like a Hugging Face repo id ('owner/name' or 'name'), not like a path."""
    return bool(HUB_ID.fullmatch(value)) and ".." not in value and "--" not in value


@dataclass(frozen=True)
class PathRule:
    workspace: Path
    allowed: tuple[Path, ...] = ()  # more folders (or files) the operator named: --allow-path, --db, ...
    confined: bool = False  # True when others can reach the server
    models: tuple[Path, ...] = ()  # model folders always allowed: the embedded models, --default-model

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser().resolve() for p in (self.workspace, *self.allowed))

    def path(self, value: str | Path, what: str = "path") -> Path:
        """`value` resolved (relative to the workspace, links followed); refused when the server is
        reachable by others and it lies outside the workspace and the allowed folders."""
        text = str(value).strip()
        if not text or "\0" in text:
            raise PathRefused(f"{what}: not a path: {text!r}")
        resolved = (Path(self.workspace) / Path(text).expanduser()).resolve()
        if self.confined and not any(resolved.is_relative_to(root) for root in self.roots):
            raise PathRefused(f"{what} {text!r} is outside the workspace{self._and_allowed()}: this server is "
                              "reachable by others, so it reads files there only (python app.py --allow-path DIR "
                              "allows another folder)")
        return resolved

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
