"""Hostile input to the store (issue 19, items 9, 10, 13, 14), each reproduced with real files, a
real FIFO, a real second connection holding the write lock (SQLite) or the rows a write needs
(PostgreSQL) and a real killed import process: a bad record is refused by name while the valid ones
around it are stored; nothing blocks or ends in a traceback; a re-import after a crash stores nothing
twice and leaves no stray files. Tests that take a `store` or `store_url` run on both engines."""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import ROOT, shapes_png, sql, sql_write
from models.data.align import Span
from workbench.store import (FileError, Store, StoreBusyError, StoreError, import_file,
                             import_records, import_upload, load_records)
from workbench.store.engine import locate


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


def test_an_image_name_too_long_for_the_file_system_in_an_upload_refuses_that_record_only(store, data_dir, tmp_path):
    """Found by the fuzz test: the look-up in the upload raised OSError (ENAMETOOLONG) with the server's path."""
    records = write_json(data_dir / "up.json", [image_record("red.png"), image_record("a" * 5000 + ".png")])
    report = import_upload(store, [records, data_dir / "red.png"], "up", tmp_path / "staging")
    assert report.stored == 1 and len(report.errors) == 1, report.errors
    assert "cannot be looked up (File name too long)" in report.errors[0] and str(tmp_path) not in report.errors[0]


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


def test_a_new_database_busy_while_its_tables_are_made_is_a_clear_error(tmp_path):
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="busy.*try again"):
            Store(path, busy_timeout_s=0.2)
    finally:
        holder.close()
    with Store(path) as store:  # once free, it opens
        assert store.datasets() == []


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


def postgres_holder(url: str):
    """A second PostgreSQL connection (as another process would) with a transaction open."""
    import psycopg

    u = locate(url).url
    holder = psycopg.connect(host=u.query["host"], port=int(u.query["port"]), user=u.username, dbname=u.database)
    return holder


def test_postgresql_a_write_waiting_out_a_lock_is_a_clear_busy_error(blank_postgres_url, data_dir):
    with Store(blank_postgres_url) as store:
        [cid] = import_records(store, "d", [("record 0", record())]).conversation_ids
    holder = postgres_holder(blank_postgres_url)
    try:  # another process in the middle of an edit of this conversation, and of an import into "d"
        holder.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (cid,))
        holder.execute("SELECT 1 FROM datasets WHERE name = 'd' FOR UPDATE")
        with Store(blank_postgres_url, busy_timeout_s=0.3) as store:
            t0 = time.monotonic()
            with pytest.raises(StoreBusyError, match="busy.*try again"):
                store.set_span(cid, 0, 0, 3, "noise", expected_version=1)
            with pytest.raises(StoreBusyError, match="busy.*try again"):
                import_records(store, "d", [("record 0", record("Another?"))])
            assert time.monotonic() - t0 < 10
            # reads wait for nobody, and another dataset imports
            assert store.conversation(cid).version == 1 and [d.name for d in store.datasets()] == ["d"]
            assert import_records(store, "e", [("record 0", record())]).stored == 1
        holder.rollback()
        with Store(blank_postgres_url) as store:  # once free, the edit goes through
            assert store.set_span(cid, 0, 0, 3, "noise", expected_version=1).version == 2
    finally:
        holder.close()


def test_postgresql_a_new_database_busy_while_its_tables_are_made_is_a_clear_error(blank_postgres_url):
    from workbench.store.migrate import ADVISORY_KEY

    holder = postgres_holder(blank_postgres_url)
    try:  # another workbench creating the tables right now
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_KEY,))
        with pytest.raises(StoreError, match="busy.*try again"):
            Store(blank_postgres_url, busy_timeout_s=0.2)
    finally:
        holder.close()
    with Store(blank_postgres_url) as store:
        assert store.datasets() == []


def test_a_database_made_by_a_newer_workbench_is_a_clear_error(store_url):
    with Store(store_url) as store:
        sql_write(store, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer than this workbench knows"):
        Store(store_url)


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


# --- item 13: a re-import stores nothing twice ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _engine(location: str) -> sa.Engine:
    """A plain engine on a store's database (no pool: each look is a fresh connection, as another process's)."""
    return sa.create_engine(locate(location).url, poolclass=sa.pool.NullPool)


def _rows(location, query: str, **params) -> list[tuple]:
    if not str(location).startswith("postgresql") and not Path(locate(location).path).exists():
        raise sa.exc.OperationalError(query, params, Exception("no database file yet"))
    with _engine(str(location)).connect() as db:
        return [tuple(r) for r in db.execute(sa.text(query), params)]


def conversation_count(location, dataset=None) -> int:
    if dataset is None:
        return _rows(location, "SELECT COUNT(*) FROM conversations")[0][0]
    return _rows(location, "SELECT COUNT(*) FROM conversations c JOIN datasets d ON d.id = c.dataset_id "
                           "WHERE d.name = :name", name=dataset)[0][0]


def test_importing_a_file_again_skips_and_names_the_records_already_there(store, data_dir):
    records = [record(), image_record("red.png"), record("Second?"), record()]  # record 3 repeats record 0
    path = write_json(data_dir / "twice.json", records)
    first = import_file(store, path, dataset="d")
    assert first.stored == 4 and not first.skipped  # a repeat inside one file is kept: it may be on purpose
    again = import_file(store, path, dataset="d")
    assert again.stored == 0 and not again.errors and again.total == 4
    assert again.skipped == ["record 0: already in dataset 'd' as conversation #1; skipped",
                             "record 1: already in dataset 'd' as conversation #2; skipped",
                             "record 2: already in dataset 'd' as conversation #3; skipped",
                             "record 3: already in dataset 'd' as conversation #4; skipped"]
    grown = import_file(store, write_json(data_dir / "grown.json", records + [record("New?"), record()]), dataset="d")
    assert grown.stored == 2 and len(grown.skipped) == 4  # the new record and a third copy of record 0
    assert store.dataset("d").total == 6
    assert import_file(store, path, dataset="other").stored == 4  # another dataset is another collection


def test_a_conversation_edited_since_its_import_is_still_recognised(store, data_dir):
    path = write_json(data_dir / "one.json", [record()])
    cid = import_file(store, path, dataset="d").conversation_ids[0]
    store.set_span(cid, 0, 0, 4, "noise", expected_version=1)
    assert import_file(store, path, dataset="d").skipped
    changed = record(answer="It is blue.")
    assert import_file(store, write_json(data_dir / "changed.json", [changed]), dataset="d").stored == 1


def test_the_command_reports_skipped_records_and_exits_0(tmp_path, data_dir):
    src = write_json(data_dir / "r.json", [record(), record("Second?")])
    assert cli("import", src, "--db", tmp_path / "c.db").returncode == 0
    done = cli("import", src, "--db", tmp_path / "c.db")
    assert done.returncode == 0, done.stderr
    assert "stored 0 of 2 records" in done.stdout and "2 already there" in done.stdout
    assert "skipped: record 1: already in dataset 'r' as conversation #2" in done.stderr


LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    source TEXT,
    extra TEXT NOT NULL DEFAULT '{}',
    search_text TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    labelled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL DEFAULT '',
    content_key TEXT,  -- what was imported (see content_key), unchanged by edits
    UNIQUE (dataset_id, position)
);
CREATE TABLE IF NOT EXISTS turns (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    speaker TEXT NOT NULL CHECK (speaker IN ('system', 'user', 'assistant')),
    text TEXT NOT NULL,
    role INTEGER NOT NULL CHECK (role IN (0, 1, 2)),
    PRIMARY KEY (conversation_id, turn)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
    conversation_id INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    role INTEGER NOT NULL CHECK (role IN (0, 1, 2)),
    CHECK (0 <= start AND start < "end"),
    PRIMARY KEY (conversation_id, turn, start),
    FOREIGN KEY (conversation_id, turn) REFERENCES turns(conversation_id, turn) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS images (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    file TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('import', 'edit', 'undo', 'redo')),
    -- edits only: 0 = in effect, 1 = undone (can be redone), 2 = undone and superseded
    state INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at REAL NOT NULL,
    before TEXT,
    after TEXT
);
CREATE INDEX IF NOT EXISTS revisions_by_conversation ON revisions (conversation_id, kind, state);
CREATE INDEX IF NOT EXISTS conversations_by_dataset ON conversations (dataset_id, position);
"""  # the schema as the store wrote it before Alembic (b1d7a30 and earlier), version 1 with the key index


def make_old_database(path, data_dir, version: int = 0) -> None:
    """A database as the store wrote it before migrations: schema version 1 (`PRAGMA user_version = 1`),
    or version 0 (before content keys). One conversation imported with an image, one imported and then
    edited (its turn 0 made NOISE, a span on turn 1, one edit undone), as that code wrote them."""
    import hashlib

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(LEGACY_SCHEMA)
    db.execute("CREATE INDEX IF NOT EXISTS conversations_by_key ON conversations (dataset_id, content_key)")
    image = (data_dir / "red.png").read_bytes()
    sha = hashlib.sha256(image).hexdigest()
    (path.parent / "images" / sha[:2]).mkdir(parents=True, exist_ok=True)
    (path.parent / "images" / sha[:2] / f"{sha}.png").write_bytes(image)
    now = 1_700_000_000.0
    db.execute("BEGIN")
    db.execute("INSERT INTO datasets (id, name, created_at) VALUES (1, 'old', ?)", (now,))
    after = '[[0, []], [1, []]]'
    for cid, (rec, key) in enumerate([(record(), "k1"), (image_record("red.png"), "k2")], 1):
        turns = rec["conversations"]
        db.execute("INSERT INTO conversations (id, dataset_id, position, source, extra, search_text, version, labelled, "
                   "created_at, updated_at, updated_by, content_key) VALUES (?, 1, ?, ?, '{}', ?, 1, ?, ?, ?, 'import', NULL)",
                   (cid, cid - 1, f"old.json record {cid - 1}", "\n".join(t["value"] for t in turns).casefold(),
                    int(cid == 1), now, now))
        for i, t in enumerate(turns):
            db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?)",
                       (cid, i, "user" if t["from"] == "human" else "assistant", t["value"],
                        1 if t.get("semantic_type") == "LANDMARK" else 0))
        db.execute("INSERT INTO revisions (conversation_id, version, kind, action, author, created_at, after) "
                   "VALUES (?, 1, 'import', ?, 'import', ?, ?)",
                   (cid, f"imported from old.json record {cid - 1}", now, after if cid == 1 else '[[0, []], [0, []]]'))
    db.execute("INSERT INTO images VALUES (2, 0, ?, ?)", (sha, f"{sha[:2]}/{sha}.png"))
    # conversation 1: three edits, the last undone
    db.execute("UPDATE turns SET role = 2 WHERE conversation_id = 1 AND turn = 0")
    db.execute('INSERT INTO spans VALUES (1, 1, 0, 2, 2)')
    for version, kind, state, action, before, after_ in [
            (2, "edit", 0, "turn 0 → noise", '[[0, []], [1, []]]', '[[2, []], [1, []]]'),
            (3, "edit", 0, "turn 1 chars 0..2 → noise", '[[2, []], [1, []]]', '[[2, []], [1, [[0, 2, 2]]]]'),
            (4, "edit", 1, "turn 1 chars 3..5 → global", '[[2, []], [1, [[0, 2, 2]]]]', '[[2, []], [1, [[0, 2, 2], [3, 5, 0]]]]'),
            (5, "undo", 0, "undo: turn 1 chars 3..5 → global", '[[2, []], [1, [[0, 2, 2], [3, 5, 0]]]]',
             '[[2, []], [1, [[0, 2, 2]]]]')]:
        db.execute("INSERT INTO revisions (conversation_id, version, kind, state, action, author, created_at, before, "
                   "after) VALUES (1, ?, ?, ?, ?, 'ann', ?, ?, ?)", (version, kind, state, action, now + version, before, after_))
    db.execute("UPDATE conversations SET version = 5, updated_by = 'ann' WHERE id = 1")
    db.execute("COMMIT")
    if version == 0:
        db.execute("DROP INDEX conversations_by_key")
        db.execute("ALTER TABLE conversations DROP COLUMN content_key")
    else:  # version 1 keyed every conversation at import
        from workbench.store.db import content_key, labels_from_json

        for cid, rec in [(1, record()), (2, image_record("red.png"))]:
            labels = labels_from_json(db.execute("SELECT after FROM revisions WHERE conversation_id = ? AND kind = 'import'",
                                                 (cid,)).fetchone()[0])
            turns = [("user" if t["from"] == "human" else "assistant", t["value"]) for t in rec["conversations"]]
            db.execute("UPDATE conversations SET content_key = ? WHERE id = ?",
                       (content_key(turns, labels, [sha] if cid == 2 else [], {}), cid))
    db.execute(f"PRAGMA user_version = {version}")
    db.close()


@pytest.mark.parametrize("version", [0, 1])
def test_an_older_database_is_upgraded_in_place_losing_nothing(tmp_path, data_dir, version):
    path = tmp_path / "old.db"
    make_old_database(path, data_dir, version)
    before = {t: sqlite3.connect(path).execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
              for t in ("datasets", "turns", "spans", "images")}
    with Store(path) as store:
        # everything is there: labels, history, undo/redo state, images
        conv = store.conversation(1)
        assert conv.version == 5 and conv.updated_by == "ann"
        assert conv.labels() == [(2, []), (1, [Span(0, 2, 2)])]
        assert [(r.version, r.kind, r.state, r.author) for r in store.history(1)] == [
            (1, "import", 0, "import"), (2, "edit", 0, "ann"), (3, "edit", 0, "ann"), (4, "edit", 1, "ann"),
            (5, "undo", 0, "ann")]
        assert store.conversation(2).images[0].read_bytes() == (data_dir / "red.png").read_bytes()
        assert store.can_redo(1) and store.can_undo(1)
        conv = store.redo(1, expected_version=5, author="bob")
        assert conv.labels() == [(2, []), (1, [Span(0, 2, 2), Span(3, 5, 0)])]
        # the import revision's labels are where an annotator's copy starts
        assert store.conversation(1, annotator="alice").labels() == [(0, []), (1, [])]
        # rows are keyed as imported: importing the same records again skips both
        report = import_file(store, write_json(data_dir / "old.json", [record(), image_record("red.png")]),
                             dataset="old")
        assert report.stored == 0 and len(report.skipped) == 2, report
        assert store.dataset("old").total == 2
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    assert db.execute("SELECT COUNT(*) FROM conversations WHERE content_key IS NULL").fetchone()[0] == 0
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok" and db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table, rows in before.items():
        if table != "turns" and table != "spans":
            assert db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() == rows
    assert db.execute("SELECT * FROM turns ORDER BY 1, 2").fetchall() == before["turns"]
    db.close()


def open_at_once(location, n: int = 4) -> list:
    """`n` Stores (each with its own connections, as separate processes would have) opened at the same
    moment on `location`; returns what each saw (datasets, or the error it raised)."""
    import threading

    barrier, seen = threading.Barrier(n), []

    def open_one():
        barrier.wait()
        try:
            with Store(location) as store:
                seen.append([(d.name, d.total) for d in store.datasets()])
        except Exception as e:  # noqa: BLE001 - the test shows it
            seen.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    return seen


def test_stores_opening_an_old_database_at_once_upgrade_it_once(tmp_path, data_dir):
    path = tmp_path / "old.db"
    make_old_database(path, data_dir, 0)
    assert open_at_once(str(path)) == [[("old", 2)]] * 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    assert db.execute("SELECT COUNT(*) FROM revisions").fetchone()[0] == 6  # nothing done twice
    db.close()


def test_stores_opening_a_new_postgresql_database_at_once_make_its_tables_once(blank_postgres_url):
    assert open_at_once(blank_postgres_url) == [[]] * 4
    with Store(blank_postgres_url) as store:
        assert sql(store, "SELECT version_num FROM alembic_version") == [("0002",)]


def noise_png(path: Path, seed: int, size: int = 96) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def stray_files(image_dir: Path, location) -> list[str]:
    """Files under image_dir that no row names: temporaries, images of uncommitted records, markers."""
    if not image_dir.exists():
        return []
    try:
        named = {f for (f,) in _rows(location, "SELECT DISTINCT file FROM images")}
    except sa.exc.DBAPIError:  # no database or no tables yet
        named = set()
    return sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*")
                  if p.is_file() and str(p.relative_to(image_dir)) not in named)


def kill_mid_batch(child: subprocess.Popen, image_dir: Path, location, after: int, timeout: float = 120) -> bool:
    """SIGKILL the importer as soon as more than `after` conversations are committed and it has image
    files on disk that no committed row names yet (inside a later batch); False when it finished first."""
    t0 = time.monotonic()
    while child.poll() is None and time.monotonic() - t0 < timeout:
        try:
            if any(not s.startswith(".importing-") for s in stray_files(image_dir, location)) and \
                    conversation_count(location) > after:
                child.kill()
                child.wait()
                return True
        except sa.exc.DBAPIError:  # the importer has not made the tables yet
            pass
        time.sleep(0.002)
    child.wait(timeout=timeout)
    return False


def run_killed_imports(tmp_path, n_records: int, kills: int, location=None):
    """Import a file of `n_records` image records into `location` (default: a SQLite file), killing the
    importer mid-batch `kills` times, then import another file and the whole file again."""
    data = tmp_path / "data"
    data.mkdir()
    records = []
    for i in range(n_records):
        noise_png(data / f"{i}.png", seed=i)
        records.append(image_record(f"{i}.png", user=f"Which colour has picture {i}?"))
    src = data / "big.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    location = location or str(tmp_path / "k.db")
    image_dir = Store(location).image_dir if location.startswith("postgresql") else tmp_path / "images"
    landed = 0  # kills that left files behind (one landing just after a commit leaves none: tried again)
    for _ in range(kills + 5):
        child = subprocess.Popen([sys.executable, "-m", "workbench.store", "import", str(src), "--db", location],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not kill_mid_batch(child, image_dir, location, after=256 * landed):  # each kill a batch further on
            break  # it finished: nothing left to kill
        landed += bool(stray_files(image_dir, location))
        if landed == kills:
            break
    # item 14: the next import, of anything, removes what the killed one left
    other = cli("import", write_json(data / "other.json", [record()]), "--db", location)
    assert other.returncode == 0, other.stderr
    assert stray_files(image_dir, location) == []
    done = cli("import", src, "--db", location, timeout=300)
    return records, location, image_dir, landed, done


def check_whole_after_kills(records, location, image_dir, done):
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    n = len(records)
    assert conversation_count(location, "big") == n  # nothing twice, nothing lost
    texts = [t for (t,) in _rows(location, "SELECT t.text FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                           "JOIN datasets d ON d.id = c.dataset_id WHERE d.name = 'big' AND speaker = 'user'")]
    if not str(location).startswith("postgresql"):
        assert _rows(location, "PRAGMA integrity_check")[0][0] == "ok"
    assert sorted(texts) == sorted(r["conversations"][0]["value"] for r in records)
    assert stray_files(image_dir, location) == []  # no orphan image, no .tmp- file, no marker
    skipped = done.stderr.count("skipped: ")
    assert f"stored {n - skipped} of {n} records" in done.stdout
    return skipped


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_an_import_killed_mid_batch_then_run_again_stores_each_record_once_and_leaves_no_files(tmp_path, engine,
                                                                                              request):
    location = None
    if engine == "postgresql":
        location = request.getfixturevalue("blank_postgres_url")
    records, location, image_dir, landed, done = run_killed_imports(tmp_path, n_records=600, kills=1,
                                                                    location=location)
    assert landed == 1
    check_whole_after_kills(records, location, image_dir, done)


@pytest.mark.stress
def test_many_imports_killed_mid_batch(tmp_path):
    records, db_path, image_dir, landed, done = run_killed_imports(tmp_path, n_records=2000, kills=6)
    assert landed >= 3
    skipped = check_whole_after_kills(records, db_path, image_dir, done)
    print(f"\nkilled imports: {landed} SIGKILLs survived, {skipped} records skipped as already there")


def test_the_annotate_tab_says_which_records_were_there_already_and_when_the_database_is_busy(tmp_path, data_dir):
    from workbench.ui.annotate import Annotator

    path = tmp_path / "tab.db"
    source = write_json(data_dir / "tab.json", [record(), record("Second?")])
    with Store(path) as store:
        annotator = Annotator(store, exports_dir=tmp_path / "exports")
        message, chosen = annotator.import_files([str(source)], "", "ann", None)
        assert "Imported 2 of 2" in message and chosen == "tab"
        message, chosen = annotator.import_files([str(source)], "", "ann", None)
        assert message.startswith("Nothing new: all 2 records are in **tab** already.") and chosen == "tab"
        assert "2 already there, skipped:" in message and "record 1: already in dataset 'tab' as conversation #2" in message
    holder = hold_write_lock(path)
    try:
        with Store(path, busy_timeout_s=0.2) as store:
            message, chosen = Annotator(store, exports_dir=tmp_path / "exports").import_files(
                [str(source)], "", "ann", "tab")
        assert message.startswith("⚠️ Import stopped: the annotation database tab.db is busy") and chosen == "tab"
    finally:
        holder.close()


def test_finding_a_record_already_there_uses_the_key_index(store):
    """Not a scan of the whole dataset per record: 10,000 records took 14 s to import and 25 s to
    re-import that way (1.6 s and 0.5 s with the index)."""
    from workbench.store.db import _POSITIONS, _POSITIONS_MANY

    import_records(store, "d", [(f"record {i}", record(f"Q{i}?")) for i in range(50)])
    with store.batch("d") as batch:
        assert batch.positions("no such key") == []
        plans = []
        for statement in (_POSITIONS.bindparams(d=batch.dataset_id, key="k"),
                          _POSITIONS_MANY.bindparams(d=batch.dataset_id, keys=["k1", "k2"])):
            query = str(statement.compile(dialect=batch.db.dialect, compile_kwargs={"literal_binds": True}))
            if store.kind == "sqlite":
                plans.append(" ".join(str(row[-1]) for row in batch.db.exec_driver_sql("EXPLAIN QUERY PLAN " + query)))
            else:  # a table of 50 rows is read whole by PostgreSQL's planner unless told to use an index
                batch.db.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plans.append(" ".join(str(row[0]) for row in batch.db.exec_driver_sql("EXPLAIN " + query)))
        assert all("conversations_by_key" in plan for plan in plans), plans
