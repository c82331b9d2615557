"""A real process saving a stream of edits and imports is killed with SIGKILL: every edit it
reported as committed is in the database, and no record or edit is half written (SQLite and
PostgreSQL: there the server outlives its killed client and rolls back what it had not committed)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, check_integrity, sql
from workbench.store import Store
from workbench.store.db import labels_from_json

WRITER = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {root!r})
    from models.data.align import Conversation, Turn
    from workbench.store import Store

    store = Store(sys.argv[1])
    rng = random.Random(0)
    ids = []
    print("ready", flush=True)
    for step in range(10**9):
        if not ids or rng.random() < 0.2:
            n = 2 + step % 5  # the record says how many turns it has, to check it is whole
            turns = [Turn("user" if t % 2 == 0 else "assistant", f"step {{step}} turn {{t}} " + "x" * 50)
                     for t in range(n)]
            cid = store.add_conversation("crash", Conversation(turns), extra={{"turns": n}})
            ids.append(cid)
            print("import", cid, n, flush=True)
        else:
            cid = rng.choice(ids)
            conv = store.conversation(cid)
            turn = rng.randrange(len(conv.turns))
            start = rng.randrange(40)
            conv = store.set_span(cid, turn, start, start + rng.randrange(1, 20), rng.randrange(3),
                                  expected_version=conv.version, author="writer")
            print("edit", cid, conv.version, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_a_stream_of_saves_loses_nothing_committed(tmp_path, store_url):
    db_path = store_url
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    child = subprocess.Popen([sys.executable, str(script), db_path], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    committed_versions: dict[int, int] = {}
    imported: dict[int, int] = {}
    try:
        assert child.stdout.readline().strip() == "ready"
        target = random.randrange(150, 300)
        for _ in range(target):
            kind, cid, value = child.stdout.readline().split()
            if kind == "import":
                imported[int(cid)] = int(value)
            else:
                committed_versions[int(cid)] = int(value)
        time.sleep(random.random() * 0.05)  # land the kill anywhere inside the next saves
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with Store(db_path) as store:
        check_integrity(store)
        ids = store.conversation_ids("crash")
        # everything the writer was told is committed is there
        assert set(imported) <= set(ids)
        for cid, version in committed_versions.items():
            assert store.conversation(cid).version >= version
        for cid in ids:
            conv = store.conversation(cid)
            # no half-written record: all its turns are there
            assert len(conv.turns) == conv.extra["turns"]
            # no half-written edit: the labels are those of the last revision, one revision per version
            history = store.history(cid)
            assert [r.version for r in history] == list(range(1, conv.version + 1))
            last_after = sql(store, "SELECT after FROM revisions WHERE conversation_id = :cid ORDER BY id DESC LIMIT 1",
                             cid=cid)[0][0]
            assert conv.labels() == labels_from_json(last_after)
    assert len(committed_versions) > 10
