"""The aligned-records cache (workbench.train.data): batches identical to aligning in the collator,
an entry per data x processor x alignment code (a change to any of them is a new entry), and a killed
or corrupt writer never read."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.data.align as align
from models.vlm.processor import load_processor
from workbench.train import DEFAULT_MODEL
from workbench.train import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor():
    return load_processor(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    from models.zoo import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.export_sharegpt(shapes.generate(8, seed=0, noise=shapes.TRAIN_NOISE), out, name="shapes")
    return out


def records_of(folder: Path) -> list:
    return json.loads((folder / "shapes.json").read_text())


def batches(collate, rows, size=3) -> list[dict]:
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key


@pytest.mark.parametrize("hsa, max_length", [(True, 1024), (False, 1024), (True, 70)])
def test_cached_batches_are_the_uncached_batches(processor, shapes_dir, tmp_path, hsa, max_length):
    records = records_of(shapes_dir)
    if max_length < 1024:  # a text-only record too, cut by max_length
        records.append({"conversations": [{"from": "human", "value": "Hi " * 60}, {"from": "gpt", "value": "Hello."}]})
    want = batches(data.uncached_collator(processor, image_root=shapes_dir, max_length=max_length, hsa=hsa), records)
    collate = data.PadCollator(processor, image_root=shapes_dir, hsa=hsa)
    cold = data.prepare(records, processor, image_root=shapes_dir, max_length=max_length, cache_dir=tmp_path)
    warm = data.prepare(records, processor, image_root=shapes_dir, max_length=max_length, cache_dir=tmp_path)
    assert (cold.source, warm.source) == ("aligned", "cache")
    assert_same(batches(collate, cold.items), want)
    assert_same(batches(collate, warm.items), want)
    assert "semantic_ids" in want[0] if hsa else "semantic_ids" not in want[0]


def test_store_conversations_are_cached_too(processor, shapes_dir, tmp_path):
    convs = [align.normalize_record(r, index=i) for i, r in enumerate(records_of(shapes_dir))]
    for conv in convs:
        conv.images = [str(shapes_dir / image) for image in conv.images]  # as the store gives them: absolute
    want = batches(data.uncached_collator(processor, max_length=1024), convs)
    assert data.prepare(convs, processor, max_length=1024, cache_dir=tmp_path).source == "aligned"
    warm = data.prepare(convs, processor, max_length=1024, cache_dir=tmp_path)
    assert warm.source == "cache"
    assert_same(batches(data.PadCollator(processor), warm.items), want)


def key(records, processor, folder, max_length=1024):
    return data.cache_key(records, processor, image_root=folder, max_length=max_length)


def test_a_change_to_the_data_is_a_new_entry(processor, shapes_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shapes_dir, folder)
    records = records_of(folder)
    before = key(records, processor, folder)
    assert key(records_of(folder), processor, folder) == before  # stable
    edited = json.loads(json.dumps(records))
    edited[3]["conversations"][1]["semantic_type"] = "NOISE"  # a role, not a word of text
    assert key(edited, processor, folder) != before
    image = folder / records[0]["images"][0]
    from PIL import Image

    with Image.open(image) as im:
        im.resize((im.width * 2, im.height * 2)).save(image)  # same name, more image tokens
    assert key(records, processor, folder) != before
    assert key(records, processor, folder, max_length=512) != key(records, processor, folder)


def test_a_change_to_the_processor_is_a_new_entry(processor, shapes_dir, tmp_path):
    records = records_of(shapes_dir)
    copy = tmp_path / "processor"
    copy.mkdir()
    for name in ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, copy / name)
    same = load_processor(str(copy))
    assert key(records, same, shapes_dir) == key(records, processor, shapes_dir)  # a copy elsewhere: same entry
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> ", 1))
    assert key(records, load_processor(str(copy)), shapes_dir) != key(records, processor, shapes_dir)
    shutil.copy(DEFAULT_MODEL / "chat_template.jinja", template)
    settings = json.loads((copy / "processor_config.json").read_text())
    settings.setdefault("image_processor", {})["max_pixels"] = 28 * 28 * 64
    (copy / "processor_config.json").write_text(json.dumps(settings))
    assert key(records, load_processor(str(copy)), shapes_dir) != key(records, processor, shapes_dir)


@pytest.mark.parametrize("code", ["align", "roles", "processor class"])
def test_a_change_to_the_alignment_code_is_a_new_entry(processor, shapes_dir, tmp_path, monkeypatch, code):
    records = records_of(shapes_dir)
    before = key(records, processor, shapes_dir)
    module = {"align": align, "roles": sys.modules[align.parse_role.__module__],
              "processor class": sys.modules[type(processor).__module__]}[code]
    changed = data.PROJECT_ROOT / "models" / f".test_changed_{tmp_path.name}.py"  # inside the project, as the code is
    try:
        changed.write_text(Path(module.__file__).read_text() + "\n# a change\n")
        monkeypatch.setattr(module, "__file__", str(changed))
        assert key(records, processor, shapes_dir) != before
    finally:
        changed.unlink(missing_ok=True)


KILLED_WRITER = """
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from models.vlm.processor import load_processor
from workbench.train import DEFAULT_MODEL, data
import json

real_save = torch.save
def save_half_and_die(obj, f):
    import io
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_and_die
folder = Path({folder!r})
data.prepare(json.loads((folder / "shapes.json").read_text()), load_processor(str(DEFAULT_MODEL)),
             image_root=folder, max_length=1024, cache_dir={cache!r})
"""


def test_a_killed_writer_leaves_nothing_that_is_read(processor, shapes_dir, tmp_path):
    cache = tmp_path / "cache"
    script = KILLED_WRITER.format(root=str(ROOT), folder=str(shapes_dir), cache=str(cache))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in cache.iterdir() if p.suffix == data.SUFFIX] == []  # only the half temporary file
    assert any(p.name.endswith(".tmp") for p in cache.iterdir())
    records = records_of(shapes_dir)
    again = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=cache)
    assert again.source == "aligned"
    assert [p.name for p in cache.iterdir()] == [again.path.name]  # the killed writer's file is cleaned up
    assert data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=cache).source == "cache"


def test_an_entry_that_does_not_read_back_whole_is_rebuilt(processor, shapes_dir, tmp_path, capsys):
    records = records_of(shapes_dir)
    first = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    whole = first.path.read_bytes()
    first.path.write_bytes(whole[: len(whole) // 3])  # truncated by a full disk, a copy, ...
    again = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    assert again.source == "aligned" and "ignoring unreadable entry" in capsys.readouterr().out
    assert first.path.read_bytes() == whole
    want = batches(data.PadCollator(processor, image_root=shapes_dir), first.items)
    assert_same(batches(data.PadCollator(processor, image_root=shapes_dir), again.items), want)


def test_an_unwritable_cache_folder_costs_the_reuse_not_the_run(processor, shapes_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    got = data.prepare(records_of(shapes_dir)[:2], processor, image_root=shapes_dir, max_length=1024,
                       cache_dir=blocker / "cache")
    assert got.source.startswith("aligned, not cached") and len(got.items) == 2


def test_default_workers():
    assert data.default_workers(cuda=False, cores=16) == 0
    assert data.default_workers(cuda=True, cores=2) == 1


def test_the_llamafactory_export_notes_what_differs_there(tmp_path):
    from workbench.store.db import Store
    from workbench.store.io import LLAMAFACTORY_NOTES, export_dataset, import_records

    with Store(tmp_path / "db.sqlite") as store:
        import_records(store, "d", [("record 0", {"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello."}]})])
        files = export_dataset(store, "d", "llamafactory", tmp_path / "lf").files
        export_dataset(store, "d", "sharegpt", tmp_path / "sharegpt")
    notes = (tmp_path / "lf" / LLAMAFACTORY_NOTES).read_text()
    assert files[-1].name == LLAMAFACTORY_NOTES
    assert "bfloat16" in notes and "after each `<|im_end|>`" in notes
    assert not (tmp_path / "sharegpt" / LLAMAFACTORY_NOTES).exists()
