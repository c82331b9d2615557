"""The attention section's handlers, without a browser, on a tiny Qwen2-VL saved to disk."""
import json

import numpy as np
import pytest

from conftest import save_tiny_qwen2vl
from workbench.chat import ModelPool
from workbench.ui.attention import EXAMPLE, EXAMPLE_IMAGE, ModelCache, overlay, redraw, show, write_example_image
from workbench.ui.context import AppContext


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    model_dir = save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-vlm"), seed=2)
    ctx = AppContext.create(tmp_path_factory.mktemp("workspace"), default_model=model_dir)
    write_example_image(ctx)
    return ctx


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def run(ctx, cache, *, text=EXAMPLE, model="default", layer=1, head=0, mean=True, mode="on", start=0, window=0):
    uploads = [ctx.workspace / EXAMPLE_IMAGE]  # the tab offers the example's image as an upload
    return show(text, model, uploads, layer, head, mean, 0, mode, start, window, ctx, cache)


def test_show_computes_the_map_the_chart_and_the_overlay(ctx, cache):
    result, status, figure, mass, picture, caption, layer, head, token = run(ctx, cache, head=3, mean=False)
    assert (ctx.workspace / EXAMPLE_IMAGE).exists()
    assert result.layer == 1 and result.head == 3
    assert "tokens" in status and "with HSA on" in status and "0.00%" in status
    np.testing.assert_allclose(np.asarray(figure.data[0].z), result.on)
    assert len(mass.data) == 4  # noise and image, off and on
    assert picture.width >= 336 and "of its attention is on this image" in caption
    assert layer.maximum == 1 and head.maximum == 3 and token.maximum == len(result) - 1
    assert result.tokens[token.value].strip()  # the overlay starts on a real text token after the image


def test_redraw_switches_maps_and_zooms_without_recomputing(ctx, cache):
    result = run(ctx, cache)[0]
    diff = redraw(result, "diff", 5, 20)
    np.testing.assert_allclose(np.asarray(diff.data[0].z), result.diff[5:25, 5:25])
    image_start = result.image_positions[0][0]
    picture, caption = overlay(result, image_start - 1, "off")
    assert "cannot see it" in caption and "HSA off" in caption


def test_errors_are_messages_and_keep_the_last_view(ctx, cache, tmp_path):
    outputs = run(ctx, cache, model=str(tmp_path / "no-such-model"))
    assert outputs[1].startswith("**Cannot show attention:**") and "no-such-model" in outputs[1]
    assert all(value == {"__type__": "update"} for i, value in enumerate(outputs) if i != 1)  # gr.skip()
    outputs = run(ctx, cache, layer=7)
    assert "layer 7 is out of range" in outputs[1]
    bad = json.dumps({"conversations": [{"from": "human", "value": "<image>hi"}]})
    assert "placeholder" in run(ctx, cache, text=bad)[1]


def test_the_model_cache_keeps_the_last_two():
    loads = []

    def loader(name):
        loads.append(name)
        return name.upper()

    cache = ModelCache(loader=loader, pool=ModelPool(budget=2))
    assert [cache.get(n) for n in ("a", "b", "a", "c", "a", "b")] == ["A", "B", "A", "C", "A", "B"]
    assert loads == ["a", "b", "c", "b"]
