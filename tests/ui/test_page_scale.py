"""The Routing tab at real-model scale (issue 16): a random AutoGLM with Qwen3-VL-30B-A3B's routing shape
(48 MoE layers x 128 experts, top-8; narrow width) answers through the page in Chromium; the layers x
experts figure has every layer and expert, marks the selected token's 8 experts per layer, and the
modality chart has 128 experts. Screenshots at 1366x768 and 1920x1080 go to ``test-artifacts/``."""

from __future__ import annotations

import pytest
from PIL import Image

from autoglm_app.modeling.small import build_small
from tests.helpers import make_engine
from tests.ui.test_ui_browser import browser, open_page, set_number, shoot  # noqa: F401 (fixture)
from tests.ui_helpers import serve_ui

LAYERS, EXPERTS, TOP_K = 48, 128, 8


@pytest.fixture(scope="module")
def wide_server():
    model, processor = build_small(seed=0, num_hidden_layers=LAYERS, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                   hidden_size=32, moe_intermediate_size=8, intermediate_size=32)
    engine = make_engine(model, processor, context_limit=512)
    server = serve_ui(engine)
    yield server.url
    server.stop()
    engine.close()


def figure_data(page, elem_id: str) -> list[dict]:
    return page.evaluate(f"""() => {{ const el = document.querySelector('#{elem_id} .js-plotly-plot');
        return el ? el._fullData.map(t => ({{type: t.type, x: t.x ? Array.from(t.x).length : 0,
                                        y: t.y ? Array.from(t.y).length : 0,
                                        z: t.z ? Array.from(t.z).length : 0}})) : null; }}""")


@pytest.mark.parametrize("width, height", [(1366, 768), (1920, 1080)])
def test_the_routing_view_at_48_layers_by_128_experts(browser, wide_server, artifacts, tmp_path, width, height):
    from playwright.sync_api import expect

    page = open_page(browser, wide_server, width, height)
    picture = tmp_path / "shapes.png"
    img = Image.new("RGB", (224, 224), (236, 234, 228))
    img.paste((210, 40, 40), (20, 20, 90, 90))
    img.save(picture)
    page.get_by_text("Generation settings").first.click()
    set_number(page, "max-tokens", 4)
    page.locator("#prompt input[type=file]").set_input_files(str(picture))
    page.locator("#prompt textarea").fill("What is in the image?")
    page.get_by_role("tab", name="Routing").click()
    page.locator("#send").click()
    expect(page.locator("#routing-figure .js-plotly-plot")).to_be_visible(timeout=120_000)
    page.wait_for_function("() => document.querySelectorAll('.generating').length === 0", timeout=120_000)
    traces = figure_data(page, "routing-figure")
    heat = next(t for t in traces if t["type"] == "heatmap")
    assert heat["z"] == LAYERS  # one row per MoE layer
    marks = [t for t in traces if t["type"] == "scatter"]
    assert marks and marks[0]["x"] == LAYERS * TOP_K  # the selected token's experts at every layer
    bars = figure_data(page, "modality-split")
    assert bars and max(t["x"] for t in bars) == EXPERTS
    expect(page.locator("#routing")).to_contain_text("expert choices")
    shoot(page, artifacts, f"routing-48x128-{width}x{height}.png")
    page.close()
