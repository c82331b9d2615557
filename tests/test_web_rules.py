"""workbench.web's rules without a server (issue 19.4-19.6): the login backoff per address with a
fake clock, parallel guesses, same-origin, the headers of served files, the upload sweep.
tests/test_web.py checks them on a running workbench."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from workbench.web import LoginBackoff, SameOrigin, ServedFiles, same_origin, served_paths, sweep_uploads


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now



def run(coroutine):
    """asyncio.run in a thread of its own: the browser tests' Playwright (sync API) keeps an event loop
    running in the main thread for the rest of the session, where asyncio.run refuses to start."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()

def login_app(clock, delay=0.0, **limits):
    async def login(request):
        form = await request.form()
        if delay:
            await asyncio.sleep(delay)
        ok = form.get("password") == "right"
        return JSONResponse({"success": ok}, status_code=200 if ok else 400)

    return Starlette(routes=[Route("/login", login, methods=["POST"])],
                     middleware=[Middleware(LoginBackoff, clock=clock, **limits)])


async def attempt(app, password="guess", client=("10.0.0.1", 1234)):
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://wb") as http:
        return await http.post("/login", data={"username": "ada", "password": password})


def test_failures_past_the_free_ones_wait_longer_each_time():
    clock = Clock()
    app = login_app(clock, free=3, first_wait_s=1, max_wait_s=8)
    codes = [run(attempt(app)).status_code for _ in range(10)]
    assert codes == [400, 400, 400] + [429] * 7
    waits = []
    for _ in range(6):  # each wait is over; the next guess fails and doubles it, up to the cap
        refused = run(attempt(app))
        waits.append(int(refused.headers["retry-after"]))
        clock.now += waits[-1]
        assert run(attempt(app)).status_code == 400
    assert waits == [1, 2, 4, 8, 8, 8]
    assert run(attempt(app, "right")).status_code == 429  # locked: the right one too
    # another address is not held up by this one
    assert run(attempt(app, "right", client=("10.0.0.2", 1))).status_code == 200
    clock.now += 8
    assert run(attempt(app, "right")).status_code == 200  # clears the count
    assert [run(attempt(app)).status_code for _ in range(4)] == [400, 400, 400, 429]


def test_failures_are_forgotten_after_a_quiet_while():
    clock = Clock()
    app = login_app(clock, free=2, forget_s=60)
    assert [run(attempt(app)).status_code for _ in range(3)] == [400, 400, 429]
    clock.now += 61
    assert [run(attempt(app)).status_code for _ in range(3)] == [400, 400, 429]


def test_parallel_guesses_get_no_more_tries():
    app = login_app(time.monotonic, delay=0.2, free=3)

    async def many():
        return await asyncio.gather(*(attempt(app) for _ in range(20)))

    codes = sorted(r.status_code for r in run(many()))
    assert codes.count(400) == 3 and codes.count(429) == 17


def test_same_origin():
    assert same_origin("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert same_origin("https://Wb.Example.org", "wb.example.org")
    assert not same_origin("http://evil.example", "127.0.0.1:7860")
    assert not same_origin("null", "127.0.0.1:7860")
    assert not same_origin("http://127.0.0.1:7861", "127.0.0.1:7860")
    assert not same_origin("http://127.0.0.1:7860", None)
    assert same_origin("https://abc.gradio.live", "127.0.0.1:7860", ["https://abc.gradio.live"])


def test_other_sites_are_refused_scripts_and_own_pages_pass():
    async def ok(request):
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", ok, methods=["GET", "POST"])], middleware=[Middleware(SameOrigin)])

    async def post(**headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://wb:7860") as http:
            return (await http.post("/x", headers=headers)).status_code

    assert run(post()) == 200
    assert run(post(Origin="http://wb:7860")) == 200
    assert run(post(Origin="http://evil.example")) == 403


@pytest.mark.parametrize("name,served_as", [("a.png", "image/png"), ("a.jpg", "image/jpeg"),
                                            ("a.html", "application/octet-stream"),
                                            ("a.svg", "application/octet-stream"),
                                            ("a.json", "application/octet-stream")])
def test_served_files_are_images_or_downloads(tmp_path, name, served_as):
    (tmp_path / name).write_bytes(b"<script>alert(1)</script>")

    async def file(request):
        return FileResponse(tmp_path / name, content_disposition_type="inline", filename=name)

    app = Starlette(routes=[Route("/gradio_api/file={path:path}", file)], middleware=[Middleware(ServedFiles)])

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://wb") as http:
            return await http.get(f"/gradio_api/file={tmp_path / name}")

    response = run(get())
    assert response.headers["content-type"].split(";")[0] == served_as
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("inline" if served_as.startswith("image/") else "attachment")
    assert name in disposition
    assert response.headers["x-content-type-options"] == "nosniff"


def test_served_paths_leave_out_the_database_and_runs(tmp_path):
    from workbench.ui.context import AppContext

    ctx = AppContext.create(tmp_path / "ws")
    served = served_paths(ctx)
    assert str(ctx.db_path.parent / "images") in served
    for private in (ctx.db_path, ctx.runs_dir, ctx.workspace / "tmp", ctx.workspace):
        assert not any(str(private) == s or str(private).startswith(s + os.sep) for s in served), private


def test_a_postgresql_stores_images_are_served_from_where_its_url_puts_them(tmp_path):
    """Issue 23: with --db postgresql://..., the pages show the images from the URL's image_dir (default:
    WORKSPACE/images), not from a folder beside a database file that does not exist."""
    from workbench.ui.context import AppContext
    from workbench.web import blocked_paths

    ctx = AppContext.create(tmp_path / "ws", db_path="postgresql://wb@dbhost/labels")
    assert str(ctx.workspace / "images") in served_paths(ctx)
    shared = AppContext.create(tmp_path / "ws", db_path=f"postgresql://wb@dbhost/labels?image_dir={tmp_path / 'shared'}")
    assert str(tmp_path / "shared") in served_paths(shared)
    assert blocked_paths(shared) == [str(shared.runs_dir)]
    sqlite = AppContext.create(tmp_path / "ws", db_path=f"sqlite:///{tmp_path / 'other' / 'wb.db'}")
    assert str(tmp_path / "other" / "images") in served_paths(sqlite)
    assert str(tmp_path / "other" / "wb.db") in blocked_paths(sqlite)


def test_the_sweep_removes_old_uploads_only(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "x").mkdir(parents=True)
    (old / "x" / "a.png").write_bytes(b"a")
    new.mkdir()
    (new / "b.png").write_bytes(b"b")
    (tmp_path / "stray.json").write_text("[]")
    day_ago = time.time() - 2 * 86400
    for p in (old / "x" / "a.png", old / "x", old, tmp_path / "stray.json", new):
        os.utime(p, (day_ago, day_ago))  # `new` is old itself but holds a fresh file
    assert sweep_uploads(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    assert sweep_uploads(tmp_path / "missing") == 0
