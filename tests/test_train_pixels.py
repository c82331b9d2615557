"""Image inputs kept with the aligned records (workbench.train.data.PIXEL_BUDGET): batches identical to
making them in the collator, kept in the cache file, and not kept at all for image sets over the budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.vlm.processor import load_processor
from workbench.train import DEFAULT_MODEL
from workbench.train import data


@pytest.fixture(scope="module")
def processor():
    return load_processor(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    from models.zoo import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.export_sharegpt(shapes.generate(7, seed=1, noise=shapes.TRAIN_NOISE), out, name="shapes")
    return out


def batches(collate, rows, size=3) -> list[dict]:
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key


def test_kept_pixels_give_the_batches_the_collator_made(processor, shapes_dir, tmp_path):
    records = json.loads((shapes_dir / "shapes.json").read_text())
    records.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    want = batches(data.uncached_collator(processor, image_root=shapes_dir, max_length=1024), records)
    cold = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    warm = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    assert (cold.source, warm.source) == ("aligned", "cache")
    for prepared in (cold, warm):
        assert [item.pixels is not None for item in prepared.items] == [bool(r.get("images")) for r in records]
        assert_same(batches(data.PadCollator(processor, image_root=shapes_dir), prepared.items), want)
    # a batch of kept pixels loads no image: the files can go
    moved = tmp_path / "elsewhere"
    assert_same(batches(data.PadCollator(processor, image_root=moved), warm.items), want)


def test_image_sets_over_the_budget_keep_no_pixels(processor, shapes_dir, tmp_path, monkeypatch):
    records = json.loads((shapes_dir / "shapes.json").read_text())
    want = batches(data.uncached_collator(processor, image_root=shapes_dir, max_length=1024), records)
    one = data.image_inputs(processor, records[0]["images"], shapes_dir, "first")
    size = sum(v.numel() * v.element_size() for v in one.values())
    monkeypatch.setattr(data, "PIXEL_BUDGET", size * (len(records) - 1))  # all but one record's worth
    prepared = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    assert all(item.pixels is None for item in prepared.items)  # all or none
    assert_same(batches(data.PadCollator(processor, image_root=shapes_dir), prepared.items), want)
    again = data.prepare(records, processor, image_root=shapes_dir, max_length=1024, cache_dir=tmp_path)
    assert again.source == "cache" and all(item.pixels is None for item in again.items)
