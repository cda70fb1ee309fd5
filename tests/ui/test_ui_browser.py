"""A real browser (headless Chromium driven by Playwright) against the live page.

One example click must show the streamed answer, a focus heatmap and a routing chart;
clicking a word must change the heatmap; screenshots at 1366x768 and 1920x1080 land in
``test-artifacts/``. A scripted engine shows the thinking message and the Stop button.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.ui_helpers import ScriptedEngine, serve_ui

from autoglm_app.events import Queued

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, url: str, width: int = 1366, height: int = 768):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#send")
    return page


def set_number(page, elem_id: str, value) -> None:
    """Type a value into a slider's number box and wait until the slider itself shows it.

    On a loaded machine the settings accordion can still be rendering when the box is first
    filled, and the typed value is then lost; so check the range input and type again."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]")
    track = page.locator(f"#{elem_id} input[type=range]")
    for attempt in range(4):
        box.fill(str(value))
        box.press("Enter")
        if not track.count():
            return
        try:
            expect(track).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            if attempt == 3:
                raise


def shoot(page, artifacts: Path, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / name))


def test_example_click_shows_answer_heatmap_routing_and_a_word_click_changes_the_heatmap(
        browser, live_server, artifacts):
    from playwright.sync_api import expect

    page = open_page(browser, live_server)
    shoot(page, artifacts, "ui-1366x768-start.png")
    page.get_by_text("Generation settings").click()
    set_number(page, "max-tokens", 24)
    set_number(page, "seed", 3)

    page.locator("#chat").get_by_text("What is in the image?").first.click()
    expect(page.locator('#chat [data-testid="bot"]').first).to_be_visible()
    expect(page.locator("#focus-caption")).to_contain_text("whole")  # the turn has finished
    heatmap = page.locator("#focus-image img")
    expect(heatmap).to_be_visible()
    before = heatmap.get_attribute("src")
    words = page.locator("#words span.token[role=button]")
    assert words.count() >= 2

    words.nth(1).click()
    expect(page.locator("#focus-caption")).not_to_contain_text("whole", timeout=15000)
    expect(heatmap).not_to_have_attribute("src", before)
    after = heatmap.get_attribute("src")
    assert page.request.get(before).body() != page.request.get(after).body()
    shoot(page, artifacts, "ui-1366x768-focus.png")

    page.get_by_role("tab", name="Routing").click()
    expect(page.locator("#routing-figure .js-plotly-plot")).to_be_visible()
    expect(page.locator("#modality-split .js-plotly-plot")).to_be_visible()
    shoot(page, artifacts, "ui-1366x768-routing.png")

    page.set_viewport_size({"width": 1920, "height": 1080})
    shoot(page, artifacts, "ui-1920x1080-routing.png")
    page.get_by_role("tab", name="Focus").click()
    expect(heatmap).to_be_visible()
    shoot(page, artifacts, "ui-1920x1080-focus.png")
    page.get_by_role("tab", name="Model").click()
    expect(page.locator("#model-panel")).to_contain_text("time to first token")
    shoot(page, artifacts, "ui-1920x1080-model.png")
    page.close()


def test_thinking_message_then_answer_and_stop_in_the_browser(browser, artifacts):
    from playwright.sync_api import expect

    engine = ScriptedEngine()
    server = serve_ui(engine)
    try:
        page = open_page(browser, server.url)
        chat = page.locator("#chat")
        page.locator("#prompt textarea").fill("Describe the picture")
        page.locator("#send").click()
        expect(chat).to_contain_text("Thinking")
        expect(chat).to_contain_text("There are three shapes.")
        expect(chat).to_contain_text("0.2")  # how long it thought
        shoot(page, artifacts, "ui-1366x768-thinking.png")

        engine.script, engine.endless = [Queued(0)], True
        page.locator("#prompt textarea").fill("Keep talking")
        page.locator("#send").click()
        expect(chat).to_contain_text("word3")
        page.locator("#stop").click()
        expect(chat).to_contain_text("(stopped)")
        assert engine.handles[-1].cancelled
        page.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def demo_server():
    """The full app on the shipped AutoGLM-Phone-Tiny, as `python app.py` serves it."""
    from autoglm_app.config import DEMO_MODEL, Settings
    from autoglm_app.server import create_app, load_engine, serve_in_thread

    settings = Settings(model=str(DEMO_MODEL))
    engine = load_engine(settings)
    running = serve_in_thread(create_app(engine, settings))
    yield running.url
    running.stop()
    engine.close()


def test_demo_model_example_shows_thinking_answer_and_focus_on_the_named_shape(browser, demo_server, artifacts):
    from playwright.sync_api import expect

    page = open_page(browser, demo_server)
    chat = page.locator("#chat")
    chat.get_by_text("What is in the image?").first.click()
    expect(chat).to_contain_text("Thinking")
    # a full reasoning trace and caption: allow a slow, busy CI machine
    expect(page.locator("#focus-caption")).to_contain_text("whole", timeout=180_000)  # the turn has finished
    expect(chat).to_contain_text("shape")
    heatmap = page.locator("#focus-image img")
    before = heatmap.get_attribute("src")
    shape_words = page.locator("#words span.token[role=button]").filter(has_text=re.compile("circle|square|triangle"))
    assert shape_words.count() >= 1
    shape_words.last.click()
    expect(heatmap).not_to_have_attribute("src", before)
    shoot(page, artifacts, "demo-1366x768-focus.png")
    page.set_viewport_size({"width": 1920, "height": 1080})
    shoot(page, artifacts, "demo-1920x1080-focus.png")
    page.close()
