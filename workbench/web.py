"""What the workbench's web server serves, and to whom (issue 19.3-19.6).

Gradio serves the page, takes uploads and serves files at /gradio_api/file=PATH. Around it, through
Gradio's own launch options and Starlette middleware handed to its FastAPI app (`app_kwargs`):

- `served_paths`: the folders whose files the pages show (the store's images, exports, the app's
  example image); the database, its WAL, the runs table and run logs are not among them, and are
  blocked besides (`blocked_paths`);
- `ServedFiles`: a file is served as an image (PNG, JPEG, GIF, WebP, BMP, TIFF) or as a download,
  never as a page of the app's origin (no HTML, no SVG with scripts);
- `SameOrigin`: a request that another site's page makes (its Origin is not this server) is refused:
  no upload, event, login or file read on behalf of someone logged in;
- `LoginBackoff`: after a few wrong passwords from one client address, logins from it are refused
  (429, Retry-After) for a wait that doubles with every further failure;
- `sweep_uploads` and `UPLOAD_CLEANUP`: temporary uploads older than a day go, at start and while the
  server runs (Gradio's `delete_cache`).
"""
from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse

MAX_UPLOAD_MB = 64  # per file; `python app.py --max-upload-mb N`
UPLOAD_CLEANUP = (3600, 86400)  # Gradio's delete_cache: every hour, uploads older than a day
LOGIN_MESSAGE = ("After 5 wrong passwords, logins from your address are refused for 1 s, then 2 s, 4 s, … "
                 "(at most 5 min): wait a moment before trying again.")
FILE_ROUTE = re.compile(r"/gradio_api/file[=/]")  # Gradio's file route and its deprecated twin
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff"}


def served_paths(ctx) -> list[str]:
    """The folders whose files the pages show: the annotation store's images (beside an SQLite database,
    or where a PostgreSQL store's URL puts them: AppContext.image_dir), exports, and the example image of
    the Attention tab."""
    return [str(ctx.image_dir), str(ctx.workspace / "exports"), str(ctx.workspace / "examples")]


def blocked_paths(ctx) -> list[str]:
    """Never served, even if a served folder held them: an SQLite database with its journal files, and runs."""
    journal = ("", "-wal", "-shm", "-journal")
    return [*(f"{db}{suffix}" for db in ctx.database_files() for suffix in journal), str(ctx.runs_dir)]


def launch_options(ctx, *, max_upload_mb: float = MAX_UPLOAD_MB, share_url=lambda: None) -> dict:
    """Keyword arguments for `Blocks.launch`: what is served, the upload limit and the middleware.
    `share_url()` is the public link once there is one (its pages are this server's own)."""
    return {
        "allowed_paths": served_paths(ctx),
        "blocked_paths": blocked_paths(ctx),
        "max_file_size": int(max_upload_mb * 1024 * 1024),
        "num_workers": 0,  # files are served by this process, through the middleware below
        # Gradio's login page says "Incorrect credentials" for a refused login too: say why it may be
        "auth_message": LOGIN_MESSAGE,
        "app_kwargs": {"middleware": [Middleware(SameOrigin, trusted=share_url), Middleware(LoginBackoff),
                                      Middleware(ServedFiles)]},
    }


# --- files: images or downloads ----------------------------------------------------------------

class ServedFiles:
    """Responses of Gradio's file route: an image keeps its type, anything else becomes an attachment
    of type application/octet-stream; no content sniffing, and a sandbox should a browser render it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not FILE_ROUTE.search(scope.get("path", "")):
            return await self.app(scope, receive, send)

        async def send_as_file(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                kind = headers.get("content-type", "").split(";")[0].strip().lower()
                if kind not in IMAGE_TYPES:
                    headers["content-type"] = "application/octet-stream"
                    disposition = headers.get("content-disposition", "")
                    headers["content-disposition"] = "attachment" + disposition[len(disposition.split(";")[0]):]
                headers["x-content-type-options"] = "nosniff"
                headers["content-security-policy"] = "default-src 'none'; sandbox"
            await send(message)

        await self.app(scope, receive, send_as_file)


# --- requests from other sites -----------------------------------------------------------------

def same_origin(origin: str, host: str | None, trusted=()) -> bool:
    """Whether a request's Origin header is this server (as the Host header names it) or a trusted URL."""
    if not host:
        return False
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and (netloc == host.lower() or any(netloc == urlsplit(t).netloc.lower() for t in trusted if t))


class SameOrigin:
    """Refuses (403) a request that carries the Origin of another site: a page elsewhere cannot upload,
    run events, log in or read files with the cookie of someone logged in here. Scripts (no Origin) and
    the workbench's own pages pass. Preflight requests are left to Gradio's CORS handling."""

    def __init__(self, app, trusted=lambda: None):
        self.app, self.trusted = app, trusted

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, headers.get("host"), [self.trusted()]):
                response = PlainTextResponse("Cross-origin request refused.", status_code=403)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# --- logins ------------------------------------------------------------------------------------

class LoginBackoff:
    """Wrong passwords per client address: `free` failures are checked at once; after that each login from
    the address waits `first_wait_s` seconds, doubled with every further failure (at most `max_wait_s`),
    and is answered 429 with Retry-After until then: the right password too, so a wait cannot be used to
    test guesses. A success clears the address; so does `forget_s` without a failure. Logins in flight
    count as failures until they are answered, so parallel guesses get no more tries."""

    def __init__(self, app, *, free: int = 5, first_wait_s: float = 1.0, max_wait_s: float = 300.0,
                 forget_s: float = 900.0, clock=time.monotonic):
        self.app, self.clock = app, clock
        self.free, self.first_wait_s, self.max_wait_s, self.forget_s = free, first_wait_s, max_wait_s, forget_s
        self.failures: dict[str, list] = {}  # address -> [failures, in flight, locked until, last failure]

    def wait_s(self, address: str) -> float:
        """Seconds before `address` may try again (0: now)."""
        entry = self.failures.get(address)
        if entry is None:
            return 0.0
        now = self.clock()
        if entry[1] == 0 and now - entry[3] > self.forget_s:
            del self.failures[address]
            return 0.0
        if entry[0] + entry[1] < self.free:
            return 0.0
        return max(entry[2] - now, 0.0) if entry[1] == 0 else max(entry[2] - now, self.first_wait_s)

    def record(self, address: str, ok: bool) -> None:
        entry = self.failures[address]
        entry[1] -= 1
        if ok:
            if entry[1] == 0:
                del self.failures[address]
            else:
                entry[0] = 0
            return
        entry[0] += 1
        entry[3] = now = self.clock()
        over = entry[0] - self.free
        if over >= 0:
            entry[2] = now + min(self.first_wait_s * 2 ** over, self.max_wait_s)
        if len(self.failures) > 10_000:  # many addresses: drop those that may try again anyway
            for key in [k for k, e in self.failures.items() if e[1] == 0 and e[2] <= now]:
                del self.failures[key]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("path", "").rstrip("/") != "/login":
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.wait_s(address)
        if wait > 0:
            seconds = math.ceil(wait)
            response = JSONResponse({"detail": f"Too many failed logins: try again in {seconds} s."}, status_code=429,
                                    headers={"Retry-After": str(seconds)})
            return await response(scope, receive, send)
        entry = self.failures.setdefault(address, [0, 0, 0.0, self.clock()])
        entry[1] += 1
        status = []

        async def watch(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.record(address, ok=bool(status) and status[0] < 400)


# --- temporary uploads -------------------------------------------------------------------------

def sweep_uploads(folder: Path, age_s: float = UPLOAD_CLEANUP[1]) -> int:
    """Remove what is directly in `folder` (the workspace's upload folder) and was last changed more
    than `age_s` ago: uploads and import staging left by a server that was killed. Returns how many."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    cutoff = time.time() - age_s
    for entry in folder.iterdir():
        try:
            newest = max([entry.lstat().st_mtime] + ([p.lstat().st_mtime for p in entry.rglob("*")]
                                                     if entry.is_dir() and not entry.is_symlink() else []))
            if newest >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError:
            continue  # another process removed or holds it: the next start tries again
    return removed
