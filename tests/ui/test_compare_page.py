"""Compare mode on the page: with a second engine the page answers each turn with both and shows B's reply
beside A's, the metrics and both teacher-forced focus maps of a word, and the QA export holds it all; without
one nothing of it exists. A real headless Chromium on the shipped demo model (A fp32, B int4)."""

from __future__ import annotations

import io
import json
import re
import zipfile

import pytest

from autoglm_app.config import DEMO_MODEL, Limits, Settings
from tests.ui.test_ui_browser import TIMEOUT_MS, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="no demo checkpoint")


@pytest.fixture(scope="module")
def engines():
    from autoglm_app.engine.worker import Engine
    from autoglm_app.loading.checkpoints import load_model

    a = Engine(load_model(str(DEMO_MODEL), quantize="fp32"), Limits(context_limit=1024))
    b = Engine(load_model(str(DEMO_MODEL), quantize="int4"), Limits(context_limit=1024))
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def compare_server(engines):
    from autoglm_app.server import create_app, serve_in_thread

    running = serve_in_thread(create_app(engines[0], Settings(model=str(DEMO_MODEL)), compare=engines[1]))
    yield running.url
    running.stop()


def test_a_compare_turn_shows_both_answers_the_metrics_and_both_focus_maps(browser, compare_server, artifacts):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(compare_server)
    page.wait_for_selector("#send")
    page.locator("#chat").get_by_text("What is in the image?").first.click()
    expect(page.locator("#focus-caption")).to_contain_text("whole", timeout=180_000)  # A's turn has finished

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-models")).to_contain_text("fp32")
    expect(page.locator("#compare-models")).to_contain_text("int4")
    metrics = page.locator("#compare-metrics")
    expect(metrics).to_contain_text("argmax agreement", timeout=120_000)  # both answers in, both teacher-forced
    expect(metrics).to_contain_text("routing Jaccard")
    expect(page.locator("#compare-words")).to_contain_text("per word of A's reply")
    answer_a = page.locator("#compare-answer-a").inner_text()
    answer_b = page.locator("#compare-answer-b").inner_text()
    assert "A: autoglm-phone-tiny fp32" in answer_a and "B: autoglm-phone-tiny int4" in answer_b
    bot = page.locator('#chat [data-testid="bot"]').last.inner_text()
    reply_a = answer_a.split("fp32", 1)[1]
    assert bot.strip().split()[-1] in reply_a  # A's column is the chat's reply (the raw stream, think tags kept)
    assert "(streaming)" not in answer_b and len(answer_b.split("int4", 1)[1].strip()) > 10
    for side in ("a", "b"):  # the heatmaps load lazily (loading="lazy"): bring each into view first
        page.locator(f"#compare-focus-{side} img").scroll_into_view_if_needed()
    expect(page.locator("#compare-focus-a img")).to_be_visible()
    expect(page.locator("#compare-focus-b img")).to_be_visible()
    before = page.locator("#compare-focus-b img").get_attribute("src")

    page.locator("#compare-word input").click()
    page.get_by_role("option", name=re.compile(r"^3\. ")).click()
    expect(page.locator("#compare-focus-b img")).not_to_have_attribute("src", before)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "ui-compare.png"), full_page=True)

    # a word clicked in the Focus tab is the one the Compare tab shows
    page.get_by_role("tab", name="Focus").click()
    page.locator("#words span.token[role=button]").nth(1).click()
    expect(page.locator("#focus-caption")).not_to_contain_text("whole", timeout=15_000)
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#compare-word input")).to_have_value(re.compile(r"^2\. "))

    # the export holds B's answer and the metrics, and B's per-word heatmaps
    page.get_by_role("tab", name="Export").click()
    page.locator("#export").click()
    link = page.locator("#export-file a").first
    expect(link).to_be_visible(timeout=60_000)
    data = page.request.get(link.get_attribute("href")).body()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        trace = json.loads(zf.read("trace.json"))
        names = zf.namelist()
    compared = trace["turns"][0]["compare"]
    assert compared["b"]["answer"] and compared["b"]["token_ids"]
    summary = compared["metrics"]["summary"]
    assert 0.0 <= summary["argmax_agreement"] <= 1.0 and summary["kl_mean"] >= 0.0
    assert 0.0 < summary["routing_jaccard"] <= 1.0
    assert any(n.startswith("turn01/compare_b/") and n.endswith(".png") for n in names)
    page.close()


def test_without_a_compare_model_nothing_of_it_exists(engines):
    from autoglm_app.ui.export import turn_record
    from autoglm_app.ui.layout import build_page
    from autoglm_app.ui.session import Turn

    demo, _ = build_page(engines[0], Settings(model=str(DEMO_MODEL)))
    ids = [getattr(block, "elem_id", None) or "" for block in demo.blocks.values()]
    assert "tab-export" in ids and not [i for i in ids if "compare" in i]
    assert turn_record(Turn(text="hi"), 1)["compare"] is None
