"""Fuzzing the importer with thousands of hostile records (issue 19): each record is either built valid
(with changes that keep it valid: scripts, roles, spans, extra fields, images in folders) or broken
by one known attack (a NUL byte, a FIFO, a device, a folder, a link out, a broken image, a deep
nesting, a lone surrogate, NaN, both lists of turns, ...), or is random JSON. The importer must never
crash (no traceback, no "error in the importer"), must refuse every broken record with a message that
names it, and must store every valid one, whole. Run through the API (as the CLI does), as a browser
upload (images confined to the upload) and once through the real command."""
from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import sqlalchemy as sa

from conftest import ROOT, check_integrity, postgres_database, shapes_png
from workbench.store import schema
from workbench.store import Store, import_file, import_upload
from workbench.store.io import INTERNAL_ERROR

IMAGES = ["red.png", "blue.png", "sub/green.png", "with space.png", "红.png"]


def make_images(folder: Path) -> None:
    """Valid images and every kind of bad one the attacks point at."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    for name, colour in zip(IMAGES, [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0), (200, 0, 200)]):
        shapes_png(folder / name, color=colour)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "text.png").write_text("hello, I am text")
    (folder / "a_folder.png").mkdir(exist_ok=True)
    if not (folder / "pipe.png").exists():
        os.mkfifo(folder / "pipe.png")
    if not (folder / "passwd.png").exists():
        (folder / "passwd.png").symlink_to("/etc/passwd")


def turn(rng, speaker, text):
    t = {"from": speaker, "value": text} if rng.random() < 0.7 else \
        {"role": {"human": "user", "gpt": "assistant"}[speaker], "content": text}
    if rng.random() < 0.4:
        t["semantic_type"] = rng.choice(["GLOBAL_CONDITION", "LANDMARK", "NOISE", 0, 1, 2, "noise"])
    if rng.random() < 0.3 and len(text) > 3:
        start = rng.randrange(len(text) - 1)
        t["spans"] = [{"start": start, "end": rng.randrange(start + 1, len(text) + 1),
                       "role": rng.choice(["noise", "LANDMARK", 0])}]
    return t


TEXTS = ["What colour is the circle?", "红色 🙂👍🏽 e\u0301 café", "שלום عربى", "zero\u200bwidth", "a\nb\tc",
         "x" * 3000, "NUL inside \u0000 text", "<b>not html</b> & ' \"", "\\u0000 escaped"]


def valid_record(rng, i: int) -> dict:
    """A record the importer must store."""
    if rng.random() < 0.05:
        return {"image": rng.choice(IMAGES), "caption": f"A shape #{i}."}
    images = rng.sample(IMAGES, rng.randrange(0, 3))
    turns = [turn(rng, "human", "<image>" * len(images) + f"#{i} " + rng.choice(TEXTS)), turn(rng, "gpt", "Red.")]
    for _ in range(rng.randrange(3)):
        turns += [turn(rng, "human", rng.choice(TEXTS)), turn(rng, "gpt", rng.choice(TEXTS))]
    key = "conversations" if "from" in turns[0] else "messages"
    record = {key: turns}
    if images:
        record["images"] = images
    if rng.random() < 0.2:
        record["system"] = rng.choice(TEXTS)
    if rng.random() < 0.2:
        record["id"] = rng.choice([i, f"id-{i}", {"nested": [1, 2, {"x": None}]}, "\u0000"])
    if rng.random() < 0.1:
        record["labelled"] = rng.random() < 0.5
    return record


def _set_first_text(record, value):
    turns = record.get("conversations") or record.get("messages")
    turns[0]["value" if "value" in turns[0] else "content"] = value


def _turns(record):
    return record.get("conversations") or record.get("messages")


# Attacks: each takes a valid record (not a caption one) and breaks it in one known way; as raw JSON text
# when the attack cannot be written by json.dumps.
ATTACKS = {
    "nul in image path": lambda r, rng: {**r, "images": ["red\x00.png"], **_one_image(r)},
    "fifo image": lambda r, rng: {**r, "images": ["pipe.png"], **_one_image(r)},
    "device image": lambda r, rng: {**r, "images": ["/dev/zero"], **_one_image(r)},
    "folder image": lambda r, rng: {**r, "images": ["a_folder.png"], **_one_image(r)},
    "missing image": lambda r, rng: {**r, "images": ["nowhere.png"], **_one_image(r)},
    "broken image": lambda r, rng: {**r, "images": ["broken.png"], **_one_image(r)},
    "text as image": lambda r, rng: {**r, "images": ["text.png"], **_one_image(r)},
    "link out as image": lambda r, rng: {**r, "images": ["passwd.png"], **_one_image(r)},
    "dot dot image": lambda r, rng: {**r, "images": ["../../../../etc/passwd"], **_one_image(r)},
    "absolute image": lambda r, rng: {**r, "images": ["/etc/hostname"], **_one_image(r)},
    "long image name": lambda r, rng: {**r, "images": ["a" * 5000 + ".png"], **_one_image(r)},
    "dot image": lambda r, rng: {**r, "images": ["."], **_one_image(r)},
    "glob image": lambda r, rng: {**r, "images": ["*[.png"], **_one_image(r)},
    "image not a string": lambda r, rng: {**r, "images": [rng.choice([3, None, {}, ["red.png"]])], **_one_image(r)},
    "images not a list": lambda r, rng: {**r, "images": rng.choice(["red.png", {"0": "red.png"}, 7])},
    "placeholder without image": lambda r, rng: _with(r, lambda x: _set_first_text(x, "<image>" * 3 + "Hi")),
    "both lists of turns": lambda r, rng: {**r, "conversations": _turns(r), "messages": _turns(r)},
    "caption and turns": lambda r, rng: {**r, "caption": "A shape."},
    "image and images": lambda r, rng: {**r, "image": "red.png", "images": ["red.png"]},
    "unknown speaker": lambda r, rng: _with(r, lambda x: _turns(x)[0].update(
        {"from": rng.choice(["robot", "", "HUMAN", 3, None]), "role": None})),
    "text not a string": lambda r, rng: _with(r, lambda x: _set_first_text(x, rng.choice([3, None, ["a"], {"t": 1}]))),
    "empty text": lambda r, rng: _with(r, lambda x: _set_first_text(x, rng.choice(["", "   ", "\n\t"]))),
    "bad span": lambda r, rng: _with(r, lambda x: _turns(x)[0].update(
        {"spans": [rng.choice([{"start": 5, "end": 2, "role": 0}, {"start": -1, "end": 2, "role": 0},
                               {"start": 0, "end": 10 ** 9, "role": 0}, {"start": 0, "end": 1, "role": "loud"},
                               {"start": "0", "end": 1, "role": 0}, "0..1", None])]})),
    "bad role": lambda r, rng: _with(r, lambda x: _turns(x)[0].update(
        {"semantic_type": rng.choice(["IMPORTANT", 7, -1, [1], {"r": 1}, 1.5, True])})),
    "turns not a list": lambda r, rng: {k: v for k, v in r.items() if k != "messages"} | {
        "conversations": rng.choice([{}, "x", [], None, 3])},
    "turn not an object": lambda r, rng: _with(r, lambda x: _turns(x).__setitem__(0, rng.choice(["hi", 3, None, []]))),
    "record not an object": lambda r, rng: rng.choice([None, 3, "record", [r], True]),
    "system not a string": lambda r, rng: {**r, "system": rng.choice([3, ["x"], {"a": 1}])},
}
TEXT_ATTACKS = {  # JSON text json.dumps would not write
    "nan in extra": lambda line: line[:-1] + ', "score": NaN}',
    "infinity in extra": lambda line: line[:-1] + ', "score": -Infinity}',
    "lone surrogate": lambda line: line.replace("#", "\\ud800#", 1),
    "malformed json": lambda line: line[: len(line) // 2],
    "deep nesting": lambda line: "[" * 100_000 + "]" * 100_000,
}


def _one_image(record):
    turns = _turns(record)
    key = "value" if "value" in turns[0] else "content"
    text = turns[0][key].replace("<image>", "")
    return {("conversations" if "conversations" in record else "messages"): [{**turns[0], key: "<image>" + text},
                                                                              *turns[1:]]}


def _with(record, change):
    record = json.loads(json.dumps(record))
    change(record)
    return record


def random_json(rng, depth=0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 10 ** 30, 1.5])
    if kind == 2:
        return "".join(rng.choice("ab<image>\u0000 红🙂") for _ in range(rng.randrange(8)))
    if kind in (3, 4):
        return rng.choice(["conversations", "messages", "images", "from", "value", "human", "gpt"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["conversations", "messages", "images", "system", "from", "value", "role", "content", "spans",
            "semantic_type", "image", "caption", "labelled", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


@dataclass
class Case:
    line: str          # the JSONL line
    kind: str          # "valid", an attack's name, or "random"
    text: str = ""     # a valid record's first user text, to find it in the store


@dataclass
class Tally:
    tried: int = 0
    stored: int = 0
    refused: int = 0
    crashed: int = 0
    by_attack: dict = field(default_factory=dict)


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    attacks = sorted(ATTACKS) + sorted(TEXT_ATTACKS)
    for i in range(n):
        roll = rng.random()
        if roll < 0.4:
            record = valid_record(rng, i)
            first = (_turns(record)[0].get("value") or _turns(record)[0].get("content")) if _turns(record) \
                else f"<image>Describe the image."
            cases.append(Case(json.dumps(record, ensure_ascii=rng.random() < 0.5), "valid", first))
            continue
        if roll < 0.9:
            record = valid_record(rng, i)
            while "caption" in record:
                record = valid_record(rng, i)
            attack = attacks[i % len(attacks)]
            if attack in ATTACKS:
                cases.append(Case(json.dumps(ATTACKS[attack](record, rng)), attack))
            else:
                cases.append(Case(TEXT_ATTACKS[attack](json.dumps(record)), attack))
            continue
        cases.append(Case(json.dumps(random_json(rng)), "random"))
    return cases


def write_cases(path: Path, cases: list[Case]) -> None:
    # CRLF endings and a BOM too: both must read as the same records
    path.write_bytes(("\ufeff" + "\r\n".join(c.line for c in cases) + "\r\n").encode("utf-8"))


def check(report, cases: list[Case], store: Store, *, confined: bool) -> Tally:
    names = [f"record {i} (line {i + 1})" for i in range(len(cases))]
    messages: dict[str, list[str]] = {}
    for message in report.errors + report.skipped:
        name = next((n for n in (message.split(":")[0], message.split(",")[0]) if n in set(names)), None)
        assert name is not None, f"a message that names no record: {message[:300]}"
        messages.setdefault(name, []).append(message)
    tally = Tally(tried=len(cases))
    assert not report.skipped  # a fresh database: nothing is already there
    for name, case in zip(names, cases):
        got = messages.get(name, [])
        assert len(got) <= 1, got
        if any(INTERNAL_ERROR in m or "Traceback" in m for m in got):
            tally.crashed += 1
            continue
        if case.kind == "valid":
            assert not got, (case.line[:300], got)
        elif case.kind != "random":
            assert got, f"{case.kind} was stored: {case.line[:300]}"
            tally.by_attack[case.kind] = tally.by_attack.get(case.kind, 0) + 1
        if got:
            tally.refused += 1
            assert str(store.image_dir.parent) not in got[0]  # no server path in a message (the record's own words only)
        else:
            tally.stored += 1
    assert tally.stored == report.stored and tally.stored + tally.refused + tally.crashed == len(cases)
    # every valid record is stored whole: its first text is there, once per valid record that has it
    firsts, seen = {}, set()
    turns = schema.turns.c  # read through the store's table, whose text type decodes what PostgreSQL keeps encoded
    with store.engine.connect() as db:  # (a text with a NUL character)
        for cid, text in db.execute(sa.select(turns.conversation_id, turns.text).where(turns.speaker == "user")
                                    .order_by(turns.conversation_id, turns.turn)):
            if cid not in seen:
                seen.add(cid)
                firsts[text] = firsts.get(text, 0) + 1
    for case in cases:
        if case.kind == "valid":
            assert firsts.get(case.text, 0) >= 1, case.line[:300]
    check_integrity(store)
    return tally


@contextlib.contextmanager
def two_stores(tmp_path: Path, engine: str, server=None):
    """Two empty stores' locations on `engine` (the API run and the upload run each get one)."""
    if engine == "sqlite":
        yield str(tmp_path / "api.db"), str(tmp_path / "upload.db")
        return
    with postgres_database(server, tmp_path / "api-images") as api, \
            postgres_database(server, tmp_path / "upload-images") as upload:
        yield api, upload


def run_fuzz(tmp_path: Path, n: int, seed: int, engine: str = "sqlite", server=None) -> tuple[Tally, Tally]:
    data = tmp_path / "data"
    make_images(data)
    cases = make_cases(n, seed)
    src = data / "fuzz.jsonl"
    write_cases(src, cases)
    with two_stores(tmp_path, engine, server) as (api_location, upload_location):
        with Store(api_location) as store:
            api = check(import_file(store, src, dataset="fuzz"), cases, store, confined=False)
        with Store(upload_location) as store:
            files = [src] + [data / name for name in IMAGES] + [data / "broken.png", data / "text.png"]
            upload = check(import_upload(store, files, "fuzz", tmp_path / "staging"), cases, store, confined=True)
    return api, upload


def summary(label: str, tally: Tally) -> str:
    return (f"{label}: {tally.tried} tried, {tally.stored} stored, {tally.refused} refused cleanly, "
            f"{tally.crashed} crashed; attacks refused: {sum(tally.by_attack.values())} of {len(tally.by_attack)} kinds")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_thousands_of_hostile_records_are_refused_by_name_and_the_valid_ones_stored(tmp_path, engine, request):
    server = request.getfixturevalue("postgres_server") if engine == "postgresql" else None
    api, upload = run_fuzz(tmp_path, n=3000, seed=19, engine=engine, server=server)
    print("\n" + summary("fuzz (API)", api) + "\n" + summary("fuzz (upload)", upload))
    assert api.crashed == 0 and upload.crashed == 0
    assert len(api.by_attack) == len(ATTACKS) + len(TEXT_ATTACKS)  # every attack was tried and refused


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_more_hostile_records(tmp_path, seed):
    api, upload = run_fuzz(tmp_path, n=10_000, seed=seed)
    print("\n" + summary(f"fuzz seed {seed} (API)", api) + "\n" + summary(f"fuzz seed {seed} (upload)", upload))
    assert api.crashed == 0 and upload.crashed == 0


@pytest.mark.stress  # nine processes (test_store_hostile runs the command on a FIFO and a NUL byte in every run)
@pytest.mark.timeout(300)
def test_the_command_never_prints_a_traceback_for_hostile_files(tmp_path):
    """The real command on the fuzz file and on hostile files: a FIFO, a device, a folder, binary data,
    a file that is not UTF-8, an empty file, a link to a device. Exit 1 or 2 with a message, never a traceback."""
    data = tmp_path / "data"
    make_images(data)
    src = data / "fuzz.jsonl"
    write_cases(src, make_cases(400, seed=7))
    hostile = {"fuzz.jsonl": src, "fifo.json": data / "fifo.json", "folder.json": data / "folder.json",
               "binary.json": data / "binary.json", "latin1.jsonl": data / "latin1.jsonl", "empty.json": data / "empty.json",
               "zero.json": data / "zero.json", "object.json": data / "object.json", "number.json": data / "number.json"}
    os.mkfifo(hostile["fifo.json"])
    hostile["folder.json"].mkdir()
    hostile["binary.json"].write_bytes(bytes(range(256)) * 4)
    hostile["latin1.jsonl"].write_bytes('{"conversations": [{"from": "human", "value": "caf\xe9"}]}'.encode("latin-1"))
    hostile["empty.json"].write_text("")
    hostile["zero.json"].symlink_to("/dev/zero")
    hostile["object.json"].write_text(json.dumps({"conversations": [{"from": "human", "value": "one object"}]}))
    hostile["number.json"].write_text("42")
    for name, path in hostile.items():
        done = subprocess.run([sys.executable, "-m", "workbench.store", "import", str(path), "--db",
                               str(tmp_path / "cli.db"), "--dataset", "d"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert "Traceback" not in done.stderr and INTERNAL_ERROR not in done.stderr, (name, done.stderr[-2000:])
        assert done.returncode in (0, 1, 2) and (done.returncode == 0 or "error: " in done.stderr), (name, done)
