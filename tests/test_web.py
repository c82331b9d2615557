"""Issue 19.3-19.6 against a real `python app.py --auth` server, as an attacker would talk to it: raw HTTP
(uploads, Gradio's /gradio_api/file= route, the page's own event handlers by number, the login form).

- 19.3: images named by a record resolve only inside what was uploaded with it (Annotate import and the
  Masks tab alike), with one error whatever exists on the disk;
- 19.4: uploaded files are served as images or attachments only, uploads have a size limit, cross-origin
  requests are refused, temporary uploads are cleaned;
- 19.5: the database, its WAL, the runs table and run logs cannot be downloaded; images and exports can;
- 19.6: wrong passwords are answered more and more slowly per client address.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, running_server, shapes_png

pytestmark = pytest.mark.slow  # starts the workbench (about 20 s)

USER, PASSWORD = "ada", "lovelace"
OUTSIDE_PNG = "/usr/share/gitweb/static/git-logo.png"  # a real image outside the workspace, if installed


# --- a workbench with a login, and a client that speaks to it as the page does -----------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    # what a workspace holds after some use: a run's log (the server makes runs/runs.sqlite itself)
    run = ws / "runs" / "run-0001"
    run.mkdir(parents=True)
    (run / "run.log").write_text("secret training log\n")
    # leftovers of an earlier server that was killed: an old upload and an import's staging folder
    old = ws / "tmp" / "0123abcd"
    old.mkdir(parents=True)
    (old / "old-upload.png").write_bytes(b"x")
    (ws / "tmp" / "upload-stale").mkdir()
    (ws / "tmp" / "upload-stale" / "records.json").write_text("[]")
    two_days_ago = time.time() - 2 * 86400
    for p in (old / "old-upload.png", old, ws / "tmp" / "upload-stale" / "records.json", ws / "tmp" / "upload-stale"):
        os.utime(p, (two_days_ago, two_days_ago))
    fresh = ws / "tmp" / "fresh-upload"
    fresh.mkdir()
    (fresh / "in-use.png").write_bytes(b"x")  # another server on this workspace may be using it
    return ws


@pytest.fixture(scope="module")
def server(workspace):
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace),
               "--auth", f"{USER}:{PASSWORD}", "--max-upload-mb", "1"]
    with running_server(command, port, workspace / "server.log") as url:
        yield url


class Page:
    """What the browser does: log in, upload files, call an event handler by number, fetch files."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120, follow_redirects=False)
        self.login()
        self.config = self.http.get("/config").json()
        self.session = uuid.uuid4().hex[:10]

    def login(self, password=PASSWORD):
        return self.http.post("/login", data={"username": USER, "password": password})

    def element(self, elem_id: str) -> int:
        return next(c["id"] for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def handler(self, trigger: str, inputs_include: str) -> dict:
        """The event handler fired by the element `trigger` whose inputs include `inputs_include`."""
        trigger_id, input_id = self.element(trigger), self.element(inputs_include)
        return next(d for d in self.config["dependencies"]
                    if any(t[0] == trigger_id for t in d["targets"]) and input_id in d["inputs"])

    def upload(self, files: dict[str, bytes], **headers) -> httpx.Response:
        return self.http.post("/gradio_api/upload", files=[("files", (name, data)) for name, data in files.items()],
                              headers=headers)

    def uploaded(self, files: dict[str, bytes]) -> list[dict]:
        response = self.upload(files)
        response.raise_for_status()
        return [{"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
                for path, name in zip(response.json(), files)]

    def call(self, dependency: dict, data: list) -> list:
        """Run an event handler through the queue, as the page does; its output values."""
        join = self.http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": dependency["id"], "session_hash": self.session, "event_data": None,
            "trigger_id": dependency["targets"][0][0]})
        join.raise_for_status()
        event_id = join.json()["event_id"]
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                    assert message.get("success"), message
                    return message["output"]["data"]
        raise AssertionError("the event never completed")

    def file(self, path, route="/gradio_api/file=", **headers) -> httpx.Response:
        return self.http.get(f"{route}{path}", headers=headers)


@pytest.fixture(scope="module")
def page(server):
    return Page(server)


def import_upload(page: Page, files: dict[str, bytes], dataset: str) -> str:
    dependency = page.handler("annotate-import", "annotate-upload")
    names = {page.element("annotate-upload"): page.uploaded(files), page.element("annotate-import-name"): dataset}
    data = [names.get(i, None) for i in dependency["inputs"]]
    return page.call(dependency, data)[0]


def record(*images) -> dict:
    return {"conversations": [{"from": "human", "value": "<image>" * len(images) + "What colour is the circle?"},
                              {"from": "gpt", "value": "It is red."}], "images": list(images)}


def png_bytes(color=(255, 0, 0)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, "PNG")
    return out.getvalue()


def datasets(workspace: Path) -> list[str]:
    from workbench.store import Store

    with Store(workspace / "workbench.db") as store:
        return [d.name for d in store.datasets()]


# --- 19.3: images resolve only inside the upload ---------------------------------------------------

PROBES = ["/etc/passwd", "/etc", "/no/such/file.png", "../../../../etc/passwd", "../workbench.db", OUTSIDE_PNG]


def test_imported_images_resolve_only_inside_the_upload(page, workspace):
    """Absolute paths, '..' and names of server files are refused with one message that depends on the
    name as written only: nothing tells a file that exists from one that does not."""
    status = import_upload(page, {"records.json": json.dumps([record(p) for p in PROBES]).encode()}, "probe")
    assert "Nothing imported" in status and "probe" not in datasets(workspace)
    lines = [line for line in status.splitlines() if line.startswith("- record")]
    assert len(lines) == len(PROBES)
    shapes = {line.replace(repr(p), "IMAGE").split(": ", 1)[1] for line, p in zip(lines, PROBES)}
    assert len(shapes) == 1, shapes  # the same words for every probe
    assert str(workspace) not in status


def test_a_link_in_an_uploaded_zip_is_not_followed(page, workspace):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("records.json", json.dumps([record("logo.png")]))
        link = zipfile.ZipInfo("logo.png")
        link.external_attr = (0o120777 << 16)  # a symbolic link ...
        z.writestr(link, OUTSIDE_PNG)  # ... to an image outside the upload
    status = import_upload(page, {"evil.zip": archive.getvalue()}, "link")
    assert "Nothing imported" in status and "is not in the upload" in status
    assert "link" not in datasets(workspace)


def test_images_in_the_upload_are_imported(page, workspace):
    status = import_upload(page, {"records.json": json.dumps([record("pics/red.png")]).encode(),
                                  "red.png": png_bytes()}, "good")
    assert "Imported 1 of 1" in status, status


def mask(page: Page, conversation: dict, uploads: list | None = None):
    from gradio_client import Client

    client = Client(page.url, auth=(USER, PASSWORD), verbose=False)
    return client.predict(json.dumps(conversation), "default", uploads or [], 0, api_name="/hsa_mask")


def test_the_masks_tab_follows_the_same_rule(page, workspace):
    """Masks (and Attention) read images from the request's uploads only; the workspace's own files
    (the database, run logs, exports, other people's uploads) are as unknown to it as /etc/passwd: what
    it says depends on the name as written (absolute or '..', or not uploaded), not on the disk."""
    shapes_png(workspace / "exports" / "in-workspace.png")
    outside = {p: mask(page, record(p))[3] for p in PROBES}
    inside = {p: mask(page, record(p))[3] for p in ["workbench.db", "runs/run-0001/run.log", "runs", "no-such.png",
                                                     "exports/in-workspace.png", "server.log"]}
    for statuses in (outside, inside):
        shapes = {s.replace(repr(p), "IMAGE") for p, s in statuses.items()}
        assert len(shapes) == 1, statuses
        assert "Cannot show" in next(iter(shapes)) and str(workspace) not in next(iter(shapes))
    assert "not in the upload" in next(iter(inside.values()))
    # the image uploaded with the request is found by its name
    from gradio_client import handle_file

    red = shapes_png(workspace.parent / "red.png")
    assert "tokens" in mask(page, record("some/folder/red.png"), [handle_file(str(red))])[3]


# --- 19.4: uploads ---------------------------------------------------------------------------------

EVIL_HTML = b"<html><script>fetch('/gradio_api/file=workbench.db')</script></html>"
EVIL_SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


@pytest.mark.parametrize("name,content", [("evil.html", EVIL_HTML), ("evil.svg", EVIL_SVG), ("evil.png", EVIL_HTML)])
def test_uploaded_files_are_never_served_as_pages(page, name, content):
    [path] = page.upload({name: content}).json()
    for route in ("/gradio_api/file=", "/gradio_api/file/"):  # Gradio's route and its deprecated twin
        check_served_safely(page.file(path, route))


def check_served_safely(served):
    assert served.status_code == 200
    assert served.headers["content-type"].split(";")[0] in ("application/octet-stream", "image/png")
    if served.headers["content-type"].startswith("application/octet-stream"):
        assert served.headers["content-disposition"].startswith("attachment")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in served.headers["content-security-policy"]


def test_uploads_have_a_size_limit(page):
    too_big = page.upload({"big.png": b"\0" * (1024 * 1024 + 1)})
    assert too_big.status_code == 413
    assert page.upload({"small.png": b"\0" * 1000}).status_code == 200


def test_cross_origin_requests_are_refused(page, server):
    """A page on another site cannot make a logged-in person's browser upload, run handlers or log in."""
    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert page.upload({"x.png": b"x"}, **evil).status_code == 403
    assert page.http.post("/gradio_api/queue/join", json={}, headers=evil).status_code == 403
    assert page.http.post("/login", data={"username": USER, "password": PASSWORD}, headers=evil).status_code == 403
    [path] = page.upload({"y.png": png_bytes()}).json()
    assert page.file(path, **evil).status_code == 403  # nor read files with the person's cookie
    # the page's own requests carry its own origin
    same = {"Origin": server}
    assert page.upload({"z.png": b"z"}, **same).status_code == 200


def test_old_temporary_uploads_are_cleaned_at_start(server, workspace):
    tmp = workspace / "tmp"
    assert not (tmp / "0123abcd").exists() and not (tmp / "upload-stale").exists()
    assert (tmp / "fresh-upload" / "in-use.png").exists()


def test_uploads_expire():
    from workbench import web

    frequency, age = web.UPLOAD_CLEANUP
    assert 0 < frequency <= age <= 2 * 86400


# --- 19.5: only what the pages need is served ------------------------------------------------------

def test_the_database_and_run_files_cannot_be_downloaded(page, workspace):
    (workspace / "workbench.db-wal").touch(exist_ok=True)
    secrets = ["workbench.db", "workbench.db-wal", "runs/runs.sqlite", "runs/run-0001/run.log", "server.log"]
    for name in secrets:
        assert (workspace / name).exists(), name
        for path in (workspace / name, f"{workspace}/./{name}", f"{workspace}/exports/../{name}"):
            for route in ("/gradio_api/file=", "/gradio_api/file/"):
                assert page.file(path, route).status_code == 403, (route, path)


def test_images_and_exports_are_served(page, workspace):
    images = sorted((workspace / "images").rglob("*.png"))
    assert images, "test_images_in_the_upload_are_imported stores one"
    served = page.file(images[0])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == images[0].read_bytes()
    # an export the person asked for comes as a download
    export = workspace / "exports" / "manual.json"
    export.write_text("[]")
    served = page.file(export)
    assert served.status_code == 200 and served.headers["content-disposition"].startswith("attachment")


# --- 19.6: logins ----------------------------------------------------------------------------------

def test_wrong_passwords_are_slowed_down(server):
    """50 wrong passwords from one address: a few are checked, the rest refused (429) until a wait that
    doubles; the right password after the wait logs in and clears the count."""
    http = httpx.Client(base_url=server, timeout=30)
    answers = []
    start = time.monotonic()
    for _ in range(50):
        answers.append(http.post("/login", data={"username": USER, "password": "guess"}))
    took = time.monotonic() - start
    checked = sum(a.status_code == 400 for a in answers)
    refused = [a for a in answers if a.status_code == 429]
    assert checked + len(refused) == 50
    assert checked <= 6, (checked, took)
    wait = float(refused[-1].headers["retry-after"])
    assert 0 < wait <= 5
    # the right password is refused too while locked: a guess cannot be confirmed
    assert http.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 429
    time.sleep(wait + 0.2)
    assert http.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
    assert http.post("/login", data={"username": USER, "password": "guess"}).status_code == 400
