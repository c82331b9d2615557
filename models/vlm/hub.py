"""Where a model name points before anything is loaded: a local directory, a hub id already in the
local cache, or a hub id to download, with one quick check of whether the hub can be reached at all.

Without it, an unknown id on a machine without network blocks in the hub client's retries (minutes),
and a missing local path is reported as a malformed repo id. Here a missing path is "not found: PATH"
and an id that is neither cached nor reachable is "cannot reach the hub for ID", at once."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

# "org/name" or "name": what the hub accepts as a repo id
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CHECK_TIMEOUT_S = 3.0
_reachable: dict[str, bool] = {}  # endpoint -> reachable, checked once per process
_lock = threading.Lock()


class ModelNotFound(OSError):
    """A model name that points nowhere; the message says where it looked."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTP request within `timeout_s` (name lookup included); checked
    once per process, and False at once under HF_HUB_OFFLINE."""
    if offline():
        return False
    endpoint = hub_endpoint()
    with _lock:
        if endpoint in _reachable:
            return _reachable[endpoint]
        result: list[bool] = []

        def connect():  # name lookup has no timeout of its own: run it where we can stop waiting
            import urllib.error
            import urllib.request

            try:  # any HTTP answer (even an error status) means the hub is there
                urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                                       timeout=timeout_s).close()
                result.append(True)
            except urllib.error.HTTPError:
                result.append(True)
            except (OSError, ValueError):
                result.append(False)

        worker = threading.Thread(target=connect, daemon=True)
        worker.start()
        worker.join(timeout_s)
        _reachable[endpoint] = bool(result and result[0])
        if not _reachable[endpoint]:
            # from now on the hub client does not try either (what HF_HUB_OFFLINE=1 does at start)
            _go_offline()
        return _reachable[endpoint]


def _go_offline(value: bool = True) -> None:
    try:
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = value
    except ImportError:
        pass
    try:
        import transformers.utils.hub as hub

        if hasattr(hub, "_is_offline_mode"):
            hub._is_offline_mode = value
    except ImportError:
        pass


def in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid id for the cache
        return False
    return isinstance(found, str)


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or not REPO_ID.match(name)


def locate(name: str | Path) -> str:
    """`name` when it can be loaded: an existing local path, a cached hub id, or a hub id while the hub
    is reachable. Raises ModelNotFound saying which it is not."""
    name = str(name).strip()
    if not name:
        raise ModelNotFound("no model given")
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if looks_like_path(name):
        raise ModelNotFound(f"not found: {name}")
    if in_cache(name):
        return name
    if not hub_reachable():
        raise ModelNotFound(f"cannot reach the hub for {name} (no local directory of that name, not in the "
                            f"local cache; {'HF_HUB_OFFLINE is set' if offline() else 'no network'})")
    return name


def reset() -> None:
    """Forget the reachability check (tests)."""
    with _lock:
        if _reachable and not all(_reachable.values()):
            _go_offline(offline())
        _reachable.clear()


__all__ = ["ModelNotFound", "locate", "hub_reachable", "in_cache", "reset"]
