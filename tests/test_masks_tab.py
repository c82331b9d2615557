"""The HSA mask tab: its functions without a browser, then the real page in headless Chromium."""
import json

import pytest

from conftest import build_qwen2vl_processor, screenshot, shapes_png
from models.data.align import AlignError
from workbench.mask_view import BLOCKED, build_mask_view, mask_figure, pair_summary, parse_conversation_text
from workbench.ui import masks
from workbench.ui.masks import EXAMPLE_MARKED, EXAMPLE_SHAREGPT, resolve_images


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    """A saved Qwen2-VL-style tokenizer + image processor, loaded back like any checkpoint."""
    path = tmp_path_factory.mktemp("processor")
    processor = build_qwen2vl_processor()
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return path


def test_both_input_formats_parse():
    marked = parse_conversation_text(EXAMPLE_MARKED)
    assert [t["from"] for t in marked["conversations"]] == ["system", "user", "assistant", "user", "user",
                                                            "assistant"]
    record = parse_conversation_text(EXAMPLE_SHAREGPT)
    text = record["conversations"][0]["value"]
    span = record["conversations"][0]["spans"][0]
    assert text[span["start"]:span["end"]] == "lol nice weather today"
    assert parse_conversation_text(json.dumps([record])) == record
    with pytest.raises(AlignError, match="malformed JSON at line 1"):
        parse_conversation_text('{"conversations": [')


def test_summary_counts_match_a_direct_count(qwen2vl_processor):
    view = build_mask_view(parse_conversation_text(EXAMPLE_SHAREGPT), qwen2vl_processor)
    roles = view.roles
    n = len(roles)
    blocked = sum(1 for q in range(n) for k in range(q + 1) if roles[q] != 2 and roles[k] == 2)
    rows = pair_summary(view)
    assert rows[-1][2] == n * (n + 1) // 2 and rows[-1][3] == blocked
    assert sum(r[3] for r in rows[:-1]) == blocked
    assert int((view.categories == BLOCKED).sum()) == blocked
    figure = mask_figure(view)
    assert figure.data[0].z.shape == (n, n)
    pooled = mask_figure(view, max_cells=20)
    assert pooled.data[0].z.shape[0] <= 20 and (pooled.data[0].z == BLOCKED).any()


def test_a_bad_conversation_warns_with_a_toast_that_expires(monkeypatch):
    warnings = []
    monkeypatch.setattr(masks.gr, "Warning", lambda message, **kw: warnings.append((message, kw)))
    outputs = masks.show_mask('{"conversations": [', "default", None, None, ctx=None, progress=lambda *a, **k: None)
    assert "malformed JSON" in outputs[3]
    [(message, kw)] = warnings
    assert "malformed JSON" in message
    assert kw.get("duration") is not None and 0 < kw["duration"] <= 30  # None: it never closes


def test_images_are_taken_from_the_uploads_only(tmp_path):
    """Issue 19.3: nothing else on the server, the workspace included, and one error whatever exists."""
    from workbench.ui.context import AppContext

    ctx = AppContext.create(tmp_path / "ws")
    upload = shapes_png(tmp_path / "red.png")
    shapes_png(ctx.workspace / "exports" / "blue.png")
    record = {"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["some/dir/red.png"]}
    assert resolve_images(record, [str(upload)], ctx)["images"] == [str(upload.resolve())]
    errors = {}
    for image in ("../../etc/passwd", "/etc/passwd", "/no/such.png", str(upload), "exports/blue.png", "workbench.db",
                  "exports", "nothing.png"):
        with pytest.raises(ValueError) as refused:
            resolve_images(dict(record, images=[image]), [], ctx)
        errors[image] = str(refused.value).replace(repr(image), "IMAGE")
    assert len(set(errors.values())) == 2, errors  # absolute or '..'; not uploaded
    assert not any(str(tmp_path) in e for e in errors.values())
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="2 uploaded images are called 'red.png'"):
        resolve_images(record, [str(upload), str(shapes_png(tmp_path / "other" / "red.png"))], ctx)


@pytest.mark.browser
def test_mask_tab_in_the_browser(workbench_url, page, processor_dir):
    page.goto(workbench_url)
    page.get_by_role("tab", name="Masks & Attention").click()
    page.get_by_role("tab", name="HSA mask", exact=True).click()
    page.fill("#mask-model textarea, #mask-model input", str(processor_dir))
    page.get_by_role("button", name="Example: ShareGPT JSON").click()
    page.wait_for_selector("#mask-status:has-text('causal query')", timeout=60_000)
    status = page.inner_text("#mask-status")
    assert "tokens" in status and "HSA blocks" in status
    page.wait_for_selector("#mask-plot .main-svg", timeout=30_000)
    assert page.locator("#mask-summary").get_by_text("blocked by HSA").count() >= 1
    strip = "".join(page.inner_text("#mask-tokens").split())
    assert "lolniceweathertoday" in strip
    screenshot(page, "masks-sharegpt")
    # bad input: a clear message, and the last good result stays
    page.locator("#mask-input .cm-content").fill('{"conversations": [{"from": "human", "value": "x", '
                                                 '"semantic_type": "CHATTER"}]}')
    page.click("#mask-show")
    page.wait_for_selector("#mask-status:has-text(\"unknown semantic role 'CHATTER'\")", timeout=30_000)
    assert page.locator("#mask-plot .main-svg").count() >= 1  # the last good mask is still there
    screenshot(page, "masks-error")


def test_a_saved_image_only_processor_loads_back_whole(tmp_path, qwen2vl_processor):
    from models.vlm.processor import load_processor

    qwen2vl_processor.save_pretrained(tmp_path)  # its class name is unknown to AutoProcessor
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    loaded = load_processor(str(tmp_path))
    assert loaded.image_processor is not None and loaded.image_token_id == qwen2vl_processor.image_token_id


def test_the_masks_tab_and_annotates_import_find_images_by_one_rule(tmp_path):
    """One function (workbench.store.io.image_in_upload) decides for both: the same names are found or
    refused, for the same reason, in the tab and in the import of the same upload."""
    from workbench.store.io import RecordError, prepare_record
    from workbench.ui.masks import UPLOADS_LABEL

    upload = tmp_path / "upload"
    (upload / "dir").mkdir(parents=True)
    red = shapes_png(upload / "red.png")
    shapes_png(upload / "dir" / "twice.png")
    shapes_png(upload / "twice.png")
    files = [red, upload / "dir" / "twice.png", upload / "twice.png"]
    import_how = "add it to the upload (several files at once, or one .zip with the records and images)"
    for image in ["red.png", "some/dir/red.png", "dir\\red.png", "/etc/passwd", "../red.png", "a\0b.png",
                  "blue.png", "x/twice.png"]:
        record = {"conversations": [{"from": "human", "value": "<image>hi"}], "images": [image]}
        try:
            prepare_record(record, base_dir=upload, confine_to=upload)
            imported = "found"
        except RecordError as error:
            imported = str(error).split("image 0", 1)[1].replace(import_how, "HOW").split("; upload a .zip")[0]
        try:
            resolve_images(record, files)
            shown = "found"
        except ValueError as error:
            shown = str(error).split("image 0", 1)[1].replace(f"add it under {UPLOADS_LABEL!r}", "HOW")
            shown = shown.split("; rename one")[0]
        assert imported == shown, (image, imported, shown)
