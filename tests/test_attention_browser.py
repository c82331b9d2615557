"""The attention section in headless Chromium: open it on the example conversation, move the layer
slider, get a new heatmap. Served by a small Blocks around `build(ctx)` on a tiny saved model."""
import pytest

from conftest import free_port, save_tiny_qwen2vl, screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def attention_url(tmp_path_factory):
    import gradio as gr

    from workbench.ui import attention
    from workbench.ui.context import AppContext

    model_dir = save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-vlm"), seed=4)
    ctx = AppContext.create(tmp_path_factory.mktemp("workspace"), default_model=model_dir)
    with gr.Blocks() as app:
        with gr.Tabs():
            with gr.Tab("Masks & attention"):
                attention.build(ctx)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                       allowed_paths=[str(ctx.workspace)])
    yield f"http://127.0.0.1:{port}"
    app.close()


def plot_title(page) -> str:
    return page.locator("#attn-plot .gtitle").first.text_content()


def test_moving_the_layer_slider_draws_a_new_heatmap(attention_url, page):
    page.goto(attention_url)
    page.locator("#attn-show").click()
    page.wait_for_selector("#attn-plot .gtitle", timeout=60_000)
    assert "layer 0" in plot_title(page) and "HSA on" in plot_title(page)
    page.wait_for_selector("#attn-status:has-text('tokens')", timeout=30_000)
    assert "0.00%" in page.inner_text("#attn-status")  # HSA on: nothing on noise
    page.wait_for_selector("#attn-overlay img", timeout=30_000)
    screenshot(page, "attention-layer0")

    layer = page.locator("#attn-layer input[type=number]")
    layer.fill("1")
    layer.press("Tab")  # the slider's release event
    page.wait_for_function(
        "() => (document.querySelector('#attn-plot .gtitle') || {}).textContent?.includes('layer 1')",
        timeout=60_000)
    assert "In layer 1" in page.inner_text("#attn-status")

    page.locator("#attn-mode").get_by_text("difference (on − off)").click()
    page.wait_for_function(
        "() => (document.querySelector('#attn-plot .gtitle') || {}).textContent?.includes('on − off')",
        timeout=30_000)
    screenshot(page, "attention-layer1-diff")
