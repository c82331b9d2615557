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

def conversation_count(path, dataset=None) -> int:
    db = sqlite3.connect(path)
    try:
        if dataset is None:
            return db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM conversations c JOIN datasets d ON d.id = c.dataset_id "
                          "WHERE d.name = ?", (dataset,)).fetchone()[0]
    finally:
        db.close()


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


def make_old_database(path, data_dir) -> None:
    """A database as the store wrote it before content keys (schema version 0), one conversation
    edited after its import."""
    with Store(path) as store:
        report = import_file(store, write_json(data_dir / "old.json", [record(), image_record("red.png")]),
                             dataset="old")
        store.set_turn_role(report.conversation_ids[0], 0, "noise", expected_version=1)
    db = sqlite3.connect(path)
    db.execute("DROP INDEX conversations_by_key")
    db.execute("ALTER TABLE conversations DROP COLUMN content_key")
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()


def test_an_older_database_is_migrated_and_its_rows_keyed(tmp_path, data_dir):
    path = tmp_path / "old.db"
    make_old_database(path, data_dir)
    with Store(path) as store:
        report = import_file(store, data_dir / "old.json", dataset="old")
        assert report.stored == 0 and len(report.skipped) == 2, report
        assert store.conversation(1).turns[0].role == 2  # the edit survived the migration
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM conversations WHERE content_key IS NULL").fetchone()[0] == 0
    db.close()


# --- items 13 and 14: an import killed with SIGKILL, then run again ------------------------------------

def noise_png(path: Path, seed: int, size: int = 96) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def stray_files(image_dir: Path, db_path: Path) -> list[str]:
    """Files under image_dir that no row names: temporaries, images of uncommitted records, markers."""
    if not image_dir.exists():
        return []
    db = sqlite3.connect(db_path)
    try:
        named = {f for (f,) in db.execute("SELECT DISTINCT file FROM images")}
    except sqlite3.OperationalError:
        named = set()
    finally:
        db.close()
    return sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*")
                  if p.is_file() and str(p.relative_to(image_dir)) not in named)


def kill_mid_batch(child: subprocess.Popen, image_dir: Path, db_path: Path, after: int, timeout: float = 120) -> bool:
    """SIGKILL the importer as soon as more than `after` conversations are committed and it has image
    files on disk that no committed row names yet (inside a later batch); False when it finished first."""
    t0 = time.monotonic()
    while child.poll() is None and time.monotonic() - t0 < timeout:
        if any(not s.startswith(".importing-") for s in stray_files(image_dir, db_path)) and \
                db_path.exists() and conversation_count(db_path) > after:
            child.kill()
            child.wait()
            return True
        time.sleep(0.002)
    child.wait(timeout=timeout)
    return False


def run_killed_imports(tmp_path, n_records: int, kills: int):
    data = tmp_path / "data"
    data.mkdir()
    records = []
    for i in range(n_records):
        noise_png(data / f"{i}.png", seed=i)
        records.append(image_record(f"{i}.png", user=f"Which colour has picture {i}?"))
    src = data / "big.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    db_path, image_dir = tmp_path / "k.db", tmp_path / "images"
    landed = 0  # kills that left files behind (one landing just after a commit leaves none: tried again)
    for _ in range(kills + 5):
        child = subprocess.Popen([sys.executable, "-m", "workbench.store", "import", str(src), "--db", str(db_path)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not kill_mid_batch(child, image_dir, db_path, after=256 * landed):  # each kill a batch further on
            break  # it finished: nothing left to kill
        landed += bool(stray_files(image_dir, db_path))
        if landed == kills:
            break
    # item 14: the next import, of anything, removes what the killed one left
    other = cli("import", write_json(data / "other.json", [record()]), "--db", db_path)
    assert other.returncode == 0, other.stderr
    assert stray_files(image_dir, db_path) == []
    done = cli("import", src, "--db", db_path, timeout=300)
    return records, db_path, image_dir, landed, done


def check_whole_after_kills(records, db_path, image_dir, done):
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    n = len(records)
    assert conversation_count(db_path, "big") == n  # nothing twice, nothing lost
    db = sqlite3.connect(db_path)
    texts = [t for (t,) in db.execute("SELECT t.text FROM turns t JOIN conversations c ON c.id = t.conversation_id "
                                      "JOIN datasets d ON d.id = c.dataset_id WHERE d.name = 'big' AND speaker = 'user'")]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert sorted(texts) == sorted(r["conversations"][0]["value"] for r in records)
    assert stray_files(image_dir, db_path) == []  # no orphan image, no .tmp- file, no marker
    skipped = done.stderr.count("skipped: ")
    assert f"stored {n - skipped} of {n} records" in done.stdout
    return skipped


def test_an_import_killed_mid_batch_then_run_again_stores_each_record_once_and_leaves_no_files(tmp_path):
    records, db_path, image_dir, landed, done = run_killed_imports(tmp_path, n_records=600, kills=1)
    assert landed == 1
    check_whole_after_kills(records, db_path, image_dir, done)


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
    import_records(store, "d", [(f"record {i}", record(f"Q{i}?")) for i in range(50)])
    with store.batch("d") as batch:
        ran = []
        batch.db.set_trace_callback(ran.append)  # the statement positions() runs, with its values in place
        try:
            assert batch.positions("no such key") == []
        finally:
            batch.db.set_trace_callback(None)
        plan = " ".join(row[-1] for row in batch.db.execute("EXPLAIN QUERY PLAN " + ran[-1]))
        assert "conversations_by_key" in plan, (ran, plan)
