"""Several app processes on one PostgreSQL database (issue 23): real OS processes, each with its own
Store and connections, see each other's edits; a stale save from one is refused and changes nothing;
writers racing in processes and threads lose no update and make no version twice; annotators editing
their copies of one conversation from different processes never conflict."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, postgres_database
from workbench.store import Store, import_records

# A workbench process reduced to its store: JSON commands in on stdin, JSON answers out on stdout.
DRIVER = textwrap.dedent('''
    import json, sys, threading
    from workbench.store import StaleVersionError, Store

    store = Store(sys.argv[1])
    print(json.dumps({"ready": True}), flush=True)

    def hammer(cid, edits, name, annotator):
        """Read, then save a change against what was read; a stale save is read again and retried."""
        done, stale = [], 0
        for k in range(edits):
            while True:
                conv = store.conversation(cid, annotator=annotator)
                length = len(conv.turns[1].text)
                start = (k * 7 + len(name)) % (length - 1)
                # the role each save gives differs from what was read: every save is a change
                role = (conv.turns[1].spans[0].role + 1) % 3 if conv.turns[1].spans and conv.turns[1].spans[0].start == 0 \\
                    and conv.turns[1].spans[0].end == length else 2
                try:
                    saved = store.set_span(cid, 1, 0, length, role, expected_version=conv.version, author=name,
                                           annotator=annotator)
                    done.append(saved.version)
                    break
                except StaleVersionError:
                    stale += 1
        return done, stale

    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op == "read":
                conv = store.conversation(command["cid"], annotator=command.get("annotator"))
                answer = {"version": conv.version, "labels": [[r, [[s.start, s.end, s.role] for s in spans]] for r, spans in conv.labels()],
                          "by": conv.updated_by}
            elif op == "span":
                conv = store.set_span(command["cid"], command["turn"], command["start"], command["end"], command["role"],
                                      expected_version=command["version"], author=command["author"],
                                      annotator=command.get("annotator"))
                answer = {"version": conv.version}
            elif op == "hammer":  # threads, each with its own connections from the store's pool
                results = [None] * command["threads"]
                def run(t):
                    results[t] = hammer(command["cids"][t % len(command["cids"])], command["edits"],
                                        f"{command['name']}-{t}", command.get("annotator"))
                threads = [threading.Thread(target=run, args=(t,)) for t in range(command["threads"])]
                [t.start() for t in threads]
                [t.join() for t in threads]
                answer = {"saved": [[command["cids"][t % len(command["cids"])], versions]
                                    for t, (versions, _) in enumerate(results)],
                          "stale": sum(stale for _, stale in results)}
            else:
                answer = {"error": f"unknown op {op}"}
        except StaleVersionError as e:
            answer = {"stale": str(e), "current": e.current_version}
        print(json.dumps(answer), flush=True)
''')


class App:
    """One driver process."""

    def __init__(self, url: str):
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER, url], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ready(self) -> None:
        line = self.process.stdout.readline()
        assert line and json.loads(line) == {"ready": True}, self.process.stderr.read()

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read()
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.send(**command)
        return self.answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def shared(postgres_server, tmp_path_factory):
    """One PostgreSQL database with three conversations, and two app processes on it."""
    images = tmp_path_factory.mktemp("pg-images")
    with postgres_database(postgres_server, images) as url:
        with Store(url) as store:
            ids = import_records(store, "d", [(f"record {i}", {"conversations": [
                {"from": "human", "value": f"Question {i}: what colour is the circle?"},
                {"from": "gpt", "value": "The circle is red, I think.", "semantic_type": "LANDMARK"}]})
                for i in range(4)]).conversation_ids
        apps = [App(url), App(url)]
        try:
            for app in apps:
                app.ready()
            yield url, ids, apps
        finally:
            for app in apps:
                app.close()


def test_two_processes_see_each_others_edits_and_a_stale_save_is_refused(shared):
    url, ids, (a, b) = shared
    cid = ids[0]
    seen_by_b = b.ask(op="read", cid=cid)
    assert seen_by_b["version"] == 1
    assert a.ask(op="span", cid=cid, turn=1, start=0, end=10, role=2, version=1, author="ann") == {"version": 2}
    # b sees a's edit at once
    now = b.ask(op="read", cid=cid)
    assert now["version"] == 2 and now["by"] == "ann" and now["labels"][1][1] == [[0, 10, 2]]
    # b's save made against what it showed before is refused, and changes nothing
    refused = b.ask(op="span", cid=cid, turn=0, start=0, end=5, role=1, version=seen_by_b["version"], author="bob")
    assert refused["current"] == 2 and "changed by ann" in refused["stale"] and "not saved" in refused["stale"]
    assert a.ask(op="read", cid=cid) == now
    with Store(url) as store:
        assert [(r.version, r.author) for r in store.history(cid)] == [(1, "import"), (2, "ann")]


def test_writers_racing_in_two_processes_lose_no_update(shared):
    url, ids, (a, b) = shared
    cids = ids[1:3]
    for app, name in ((a, "a"), (b, "b")):  # 2 processes x 4 threads on two conversations, at once
        app.send(op="hammer", cids=cids, edits=15, threads=4, name=name)
    results = [a.answer(), b.answer()]
    made: dict[int, list[int]] = {cid: [] for cid in cids}
    for result in results:
        for cid, versions in result["saved"]:
            made[cid] += versions
    with Store(url) as store:
        for cid in cids:
            conv = store.conversation(cid)
            history = store.history(cid)
            # every save made a version of its own: none overwrote another (a lost update would show as a
            # version made twice, or as fewer versions than saves)
            assert sorted(made[cid]) == list(range(2, 2 + len(made[cid])))
            assert conv.version == 1 + len(made[cid]) == len(history)
            assert [r.version for r in history] == list(range(1, conv.version + 1))
            assert conv.labels()[1][1] and conv.updated_by in {f"{n}-{t}" for n in "ab" for t in range(4)}
    assert sum(len(v) for v in made.values()) == 2 * 4 * 15
    print(f"\n120 saves by 8 writers in 2 processes: {sum(r['stale'] for r in results)} refused as stale and retried")


def test_annotators_editing_their_copies_from_two_processes_never_conflict(shared):
    url, ids, (a, b) = shared
    cid = ids[3]
    a.send(op="hammer", cids=[cid], edits=10, threads=1, name="alice", annotator="alice")
    b.send(op="hammer", cids=[cid], edits=10, threads=1, name="bob", annotator="bob")
    alice, bob = a.answer(), b.answer()
    assert alice["stale"] == bob["stale"] == 0  # each copy has its own version: the two never collide
    assert alice["saved"] == [[cid, list(range(2, 12))]] and bob["saved"] == [[cid, list(range(2, 12))]]
    with Store(url) as store:
        assert {name: c.version for name, c in store.copies(cid).items()} == {"alice": 11, "bob": 11}
        assert store.conversation(cid).version == 1
