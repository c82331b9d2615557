"""Importing what a person uploads from the browser (issue 20): records with their images, one by one
or in a .zip; images found inside the upload only; errors in the person's terms; no empty dataset
after a failed import; imported roles count as labels; one JSON/JSONL reader for store and training."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, shapes_png
from workbench.store import FileError, export_dataset, import_upload, load_records, read_records

EXAMPLES = ROOT / "annotations" / "examples"


def rec(image=None, user="What colour is the circle?", **extra):
    r = {"conversations": [{"from": "human", "value": ("<image>" if image else "") + user},
                           {"from": "gpt", "value": "It is red."}], **extra}
    if image:
        r["images"] = [image]
    return r


def zip_of(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def test_the_examples_import_from_a_zip_with_their_images(store, tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(EXAMPLES / "shapes_examples.json", "shapes_examples.json")
        for image in (EXAMPLES / "shapes_examples").iterdir():
            z.write(image, f"shapes_examples/{image.name}")
    report = import_upload(store, [(archive, "shapes.zip")], "", tmp_path / "staging")
    assert report.errors == [] and report.stored == 24 and report.dataset == "shapes_examples"
    conv = store.conversation(report.conversation_ids[0])
    assert conv.images[0].read_bytes() == (EXAMPLES / "shapes_examples" / "00000.png").read_bytes()
    # the turns carry roles: they count as labelled (issue 20.6)
    assert store.dataset("shapes_examples").labelled == 24


def test_records_and_images_chosen_together_are_matched_by_file_name(store, tmp_path):
    """A browser sends loose files without their folders: `shapes_examples/00000.png` is found as
    the one uploaded file called 00000.png."""
    files = [(EXAMPLES / "shapes_examples.json", "shapes_examples.json")]
    files += [(p, p.name) for p in sorted((EXAMPLES / "shapes_examples").iterdir())[:3]]
    report = import_upload(store, files, "some", tmp_path / "staging")
    assert report.stored == 3 and len(report.errors) == 21
    assert report.errors[0] == ("record 3: image 0 ('shapes_examples/00003.png') is not in the upload: add it "
                                "to the upload (several files at once, or one .zip with the records and images)")


def test_the_tabs_own_export_imports_back(store, tmp_path):
    shapes_png(tmp_path / "red.png")
    (tmp_path / "d.json").write_text(json.dumps([rec("red.png"), rec(user="No image?")]))
    assert not import_upload(store, [(tmp_path / "d.json", "d.json"), (tmp_path / "red.png", "red.png")], "d",
                             tmp_path / "s1").errors
    export_dataset(store, "d", "sharegpt", tmp_path / "out")
    import shutil

    archive = shutil.make_archive(str(tmp_path / "export"), "zip", tmp_path / "out")
    report = import_upload(store, [(archive, "export.zip")], "again", tmp_path / "s2")
    assert report.stored == 2 and not report.errors
    assert store.conversation(report.conversation_ids[0]).images[0].read_bytes() == (tmp_path / "red.png").read_bytes()


def test_images_outside_the_upload_are_refused(store, tmp_path):
    secret = shapes_png(tmp_path / "secret.png")
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "link.png").symlink_to(secret)
    records = [rec(str(secret)), rec("../secret.png"), rec("link.png"), rec("nested/../../secret.png")]
    archive = zip_of(tmp_path / "up.zip", {"d.json": json.dumps(records)})
    report = import_upload(store, [(archive, "up.zip")], "d", tmp_path / "staging")
    assert report.stored == 0 and len(report.errors) == 4
    assert "only paths inside the upload" in report.errors[0]
    assert "only paths inside the upload" in report.errors[1] and "only paths inside" in report.errors[3]
    assert "is not in the upload" in report.errors[2]  # the staging folder has no link.png
    # a link planted in the staging folder itself is not followed either
    staging = tmp_path / "staging2"
    staging.mkdir()
    report = import_upload(store, [(tmp_path / "up.zip", "up.zip")], "d", staging)
    assert report.stored == 0
    # ... and a zip entry that climbs out is refused before anything is written
    bad = zip_of(tmp_path / "bad.zip", {"d.json": json.dumps([rec()]), "../evil.png": b"x"})
    with pytest.raises(FileError, match="would leave the upload"):
        import_upload(store, [(bad, "bad.zip")], "d", tmp_path / "staging3")
    assert not (tmp_path / "evil.png").exists()
    assert [d.name for d in store.datasets()] == []  # and no empty dataset was left (issue 20.3)


def test_a_symlink_inside_the_upload_pointing_out_is_refused(store, tmp_path):
    secret = shapes_png(tmp_path / "secret.png")
    staging = tmp_path / "staging"
    staging.mkdir()
    (tmp_path / "d.json").write_text(json.dumps([rec("pic.png")]))
    # as if the upload held a link (a zip cannot plant one: links in zips are skipped)
    os.symlink(secret, staging / "pic.png")
    report = import_upload(store, [(tmp_path / "d.json", "d.json")], "d", staging)
    assert report.stored == 0 and "link leaving the upload" in report.errors[0]


def test_a_non_image_is_named_by_record_and_image_without_server_paths(store, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "d.json").write_text(json.dumps([rec(), rec("notes.txt")]))
    report = import_upload(store, [(tmp_path / "d.json", "d.json"), (tmp_path / "notes.txt", "notes.txt")], "",
                           tmp_path / "staging")
    assert report.stored == 1
    assert report.errors == ["record 1: image 0 ('notes.txt') is not an image (expected PNG, JPEG, GIF, WebP, BMP "
                             "or TIFF)"]


def test_malformed_json_names_the_uploaded_file_not_a_server_path(store, tmp_path):
    bad = tmp_path / "gradio-tmp-3f2a" / "mine.json"
    bad.parent.mkdir()
    bad.write_text('[{"conversations": [}]')
    with pytest.raises(FileError) as e:
        import_upload(store, [(bad, "mine.json")], "", tmp_path / "staging")
    assert str(e.value).startswith("mine.json: malformed JSON at line 1") and str(tmp_path) not in str(e.value)
    assert store.datasets() == []


def test_an_import_where_every_record_fails_creates_no_dataset(store, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": []}, rec("missing.png")]))
    report = import_upload(store, [(tmp_path / "d.json", "d.json")], "fresh", tmp_path / "staging")
    assert report.stored == 0 and len(report.errors) == 2
    assert store.datasets() == []


def test_labelled_on_import_follows_the_data(store, tmp_path):
    from workbench.store import import_records

    plain = rec()
    roles = rec()
    roles["conversations"][1]["semantic_type"] = "LANDMARK"
    spans = rec()
    spans["conversations"][0]["spans"] = [{"start": 0, "end": 4, "role": "NOISE"}]
    said = dict(roles, labelled=False)
    report = import_records(store, "d", [("a", plain), ("b", roles), ("c", spans), ("d", said)])
    assert [store.conversation(c).labelled for c in report.conversation_ids] == [False, True, True, False]
    # an export keeps the flag, so a round trip does not turn untouched conversations into labelled ones
    export_dataset(store, "d", "sharegpt", tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "d.json").read_text())
    assert [r["labelled"] for r in exported] == [False, True, True, False]
    again = import_upload(store, [(tmp_path / "out" / "d.json", "d.json")], "again", tmp_path / "staging")
    assert [store.conversation(c).labelled for c in again.conversation_ids] == [False, True, True, False]
    assert "labelled" not in store.conversation(again.conversation_ids[0]).extra


def test_rename_a_dataset(store):
    from workbench.store import StoreError, import_records

    import_records(store, "a", [("r", rec())])
    import_records(store, "b", [("r", rec())])
    assert store.rename_dataset("a", " c ") == "c"
    assert [d.name for d in store.datasets()] == ["b", "c"]
    with pytest.raises(StoreError, match="exists already"):
        store.rename_dataset("c", "b")
    with pytest.raises(StoreError, match="non-empty"):
        store.rename_dataset("c", "  ")


def test_one_reader_for_store_and_training_keeps_u2028_inside_a_record(tmp_path):
    """Issue 20.22: JSONL lines end at \\n only; U+2028 inside a JSON string is text."""
    from workbench.train.config import parse_config
    from workbench.train.run import load_records as train_records

    record = rec(user="line one\u2028line two\u2029para")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(rec()) + "\n", encoding="utf-8")
    assert [r for _, r in read_records(path)] == load_records(path) == [record, rec()]
    assert train_records(parse_config({"dataset": str(path)}, base_dir=tmp_path)) == [record, rec()]
    path.write_text(json.dumps(rec()) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(FileError, match="line 2"):
        load_records(path)


def test_the_command_line_uses_the_apps_database_by_default():
    """Issue 20.21: one default, the app's WORKSPACE/workbench.db."""
    import app
    from workbench.store import DEFAULT_DB

    assert DEFAULT_DB == app.parse_args([]).workspace.resolve() / "workbench.db"
