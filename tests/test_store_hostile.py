"""Hostile input to the store (issue 19, items 9, 10, 13, 14), each reproduced with real files, a
real FIFO, a real second SQLite connection holding the write lock and a real killed import process:
a bad record is refused by name while the valid ones around it are stored; nothing blocks or ends in
a traceback; a re-import after a crash stores nothing twice and leaves no stray files."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, shapes_png
from workbench.store import FileError, Store, StoreError, import_file, import_records, import_upload, load_records


def record(user="What colour is the circle?", answer="It is red.", **extra):
    return {"conversations": [{"from": "human", "value": user},
                              {"from": "gpt", "value": answer, "semantic_type": "LANDMARK"}], **extra}


def image_record(image, user="What colour?"):
    return {"conversations": [{"from": "human", "value": "<image>" + user}, {"from": "gpt", "value": "Red."}],
            "images": [image]}


def cli(*args, timeout=60):
    """`python -m workbench.store ARGS` in a real process."""
    return subprocess.run([sys.executable, "-m", "workbench.store", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db" / "workbench.db") as s:
        yield s


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    shapes_png(d / "red.png")
    return d


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


# --- item 9: a NUL byte, a FIFO, a device, a busy database, reads without the write lock ------------

def test_an_image_path_with_a_nul_byte_refuses_that_record_only(store, data_dir):
    records = [record(), image_record("red\x00.png"), record("Second?"), image_record("red.png")]
    report = import_file(store, write_json(data_dir / "nul.json", records))
    assert report.stored == 3, report.errors
    assert len(report.errors) == 1 and report.errors[0].startswith("record 1: image 0")
    assert "NUL" in report.errors[0]


def test_an_image_path_with_a_nul_byte_in_an_upload_refuses_that_record_only(store, data_dir, tmp_path):
    records = write_json(data_dir / "up.json", [image_record("red.png"), image_record("re\x00d.png")])
    report = import_upload(store, [records, data_dir / "red.png"], "up", tmp_path / "staging")
    assert report.stored == 1 and len(report.errors) == 1 and "NUL" in report.errors[0], report.errors


def test_the_command_reports_a_nul_byte_record_and_stores_the_others(tmp_path, data_dir):
    src = write_json(data_dir / "nul.json", [record(), image_record("red\x00.png"), record("Second?")])
    done = cli("import", src, "--db", tmp_path / "c.db")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "stored 2 of 3" in done.stdout and "record 1: image 0" in done.stderr


@pytest.mark.timeout(60)  # before the fix, reading the FIFO blocked forever
def test_a_fifo_named_json_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "records.json"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    try:
        done = cli("import", fifo, "--db", tmp_path / "c.db", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the importer blocked on a FIFO")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a regular file" in done.stderr, done.stderr
    assert time.monotonic() - t0 < 30
    with pytest.raises(FileError, match="not a regular file"):
        load_records(fifo)  # training reads datasets with the same reader


@pytest.mark.timeout(30)
def test_a_fifo_or_a_device_as_an_image_is_refused_by_record(store, data_dir):
    os.mkfifo(data_dir / "pipe.png")
    records = [image_record("pipe.png"), image_record("/dev/zero"), image_record("red.png")]
    report = import_records(store, "d", [(f"record {i}", r) for i, r in enumerate(records)], base_dir=data_dir)
    assert report.stored == 1, report.errors
    assert [e.split(":")[0] for e in report.errors] == ["record 0", "record 1"]
    assert all("not a regular file" in e for e in report.errors), report.errors


def hold_write_lock(path) -> sqlite3.Connection:
    """A second connection (as another process would) holding the database's write lock."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


def test_a_busy_database_is_a_clear_error_not_a_raw_sqlite_one(tmp_path, data_dir):
    path = tmp_path / "busy.db"
    Store(path).close()
    holder = hold_write_lock(path)
    try:
        with Store(path, busy_timeout_s=0.3) as store:
            with pytest.raises(StoreError, match="busy") as error:
                import_records(store, "d", [("record 0", record())])
            assert "try again" in str(error.value)
        done = cli("import", write_json(data_dir / "r.json", [record()]), "--db", path, "--busy-timeout", 0.5)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "busy" in done.stderr and "try again" in done.stderr
    finally:
        holder.close()


def test_list_and_export_do_not_wait_for_the_write_lock(tmp_path, data_dir):
    path = tmp_path / "read.db"
    with Store(path) as store:
        import_records(store, "shapes", [("record 0", record())])
    holder = hold_write_lock(path)
    try:
        with Store(path, busy_timeout_s=0.3) as store:  # opening the store takes no write lock
            assert [d.name for d in store.datasets()] == ["shapes"]
        t0 = time.monotonic()
        done = cli("list", "--db", path)
        assert done.returncode == 0 and "shapes\t1/1" in done.stdout, done.stderr
        done = cli("export", "shapes", "--format", "sharegpt", "--out", tmp_path / "out", "--db", path)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - t0 < 25  # the busy timeout is 30 s: neither waited for the lock
        assert len(json.loads((tmp_path / "out" / "shapes.json").read_text())) == 1
    finally:
        holder.close()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("these are my notes, not a database " * 100)
    done = cli("list", "--db", bad)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "not an annotation database" in done.stderr


# --- item 10: both 'conversations' and 'messages' ----------------------------------------------------

def test_a_record_with_both_conversations_and_messages_is_refused_by_name(store, data_dir):
    both = {**record(), "messages": [{"role": "user", "content": "Another question?"}]}
    report = import_file(store, write_json(data_dir / "both.json", [record(), both]))
    assert report.stored == 1
    assert report.errors == ["record 1: has both 'conversations' and 'messages'; give one"]
    with pytest.raises(FileError, match="record 1: has both 'conversations' and 'messages'"):
        load_records(data_dir / "both.json")  # what training reads
