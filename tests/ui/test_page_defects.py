"""Issue 16's page defects, one Playwright (Chromium) test each, against a scripted engine.

Defects 2 (trash icon), 3 (examples start a new chat), 5 (seed / slider validation), 8 (refused upload),
9 (copy copies the answer only) and 11 (no domain line without a model card). The defects that need real
focus maps and routing (1, 4, 6, 7, the README screenshot, 11 with the demo card) are in
test_page_defects_demo.py; 10 (start-up) is tests/server/test_startup.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.ui.page_defects_helpers import (error_badges, open_settings, send, serve_page, user_messages, user_texts,
                                           wait_idle, wait_turns, warnings)
from tests.ui.test_ui_browser import browser  # noqa: F401 (fixture)
from tests.ui_helpers import ScriptedEngine

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def scripted():
    """(engine, url): the page on a ScriptedEngine (reasoning "Let me look. Three shapes.", answer "There are
    three shapes."), default settings."""
    from autoglm_app.config import Settings

    engine = ScriptedEngine()
    engine.delay = 0.01
    server = serve_page(engine, Settings(model="small"))
    yield engine, server.url
    server.stop()


@pytest.fixture(scope="module")
def small_upload_limit():
    """(engine, url): the page with a 1 MiB upload limit (--max-upload-mb 1)."""
    from autoglm_app.config import Limits, Settings

    engine = ScriptedEngine()
    engine.delay = 0.01
    server = serve_page(engine, Settings(model="small", limits=Limits(max_upload_mb=1.0)))
    yield engine, server.url
    server.stop()


def open_page(browser, url: str, width: int = 1366, height: int = 768, context=None):
    page = context.new_page() if context else browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#send")
    wait_idle(page)
    return page


def turn_choices(page) -> list[str]:
    """The labels of the Focus tab's Turn picker (#turn-pick)."""
    page.get_by_role("tab", name="Focus").click()
    page.locator("#turn-pick input").click()
    options = page.locator('[data-testid="dropdown-option"]')
    options.first.wait_for()
    labels = [t.strip().lstrip("✓").strip() for t in options.all_inner_texts()]
    page.keyboard.press("Escape")
    return labels


def test_2_trash_icon_then_send_leaves_one_turn(browser, scripted):
    page = open_page(browser, scripted[1])
    send(page, "first question", n_after=1)
    page.locator("#chat").get_by_role("button", name="Clear", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=user]').length === 0")
    wait_idle(page)
    send(page, "second question")
    page.wait_for_function("() => [...document.querySelectorAll('#chat [data-testid=user]')]"
                           ".some(m => m.innerText.includes('second question'))", timeout=TIMEOUT_MS)
    wait_idle(page)
    time.sleep(1.0)
    assert user_texts(page) == ["second question"]
    labels = turn_choices(page)
    assert [label for label in labels if label != "latest"] == ["1: second question"], labels
    page.close()


def test_3_second_example_starts_a_new_conversation(browser, scripted):
    page = open_page(browser, scripted[1])
    page.locator("#chat").get_by_text("What is in the image?").first.click()  # the chat's example card
    wait_turns(page, 1)
    assert "What is in the image?" in user_messages(page).first.inner_text()
    page.locator("#examples").get_by_text("scene3.png: What color is the triangle?").click()
    page.wait_for_function("() => [...document.querySelectorAll('#chat [data-testid=user]')]"
                           ".some(m => m.innerText.includes('What color is the triangle?'))", timeout=TIMEOUT_MS)
    wait_idle(page)
    time.sleep(1.0)
    texts = user_texts(page)
    assert len(texts) == 1 and "What color is the triangle?" in texts[0], texts
    assert "What is in the image?" not in page.locator("#chat").inner_text()
    labels = turn_choices(page)
    assert [label for label in labels if label != "latest"] == ["1: What color is the triangle?"], labels
    page.close()


def test_5_negative_seed_warns_and_sends_nothing(browser, scripted):
    engine, url = scripted
    page = open_page(browser, url)
    sent = len(engine.handles)
    open_settings(page)
    seed = page.locator("#seed input")
    for _ in range(3):  # on a loaded machine the box can still be rendering when first typed into
        seed.fill("-7")
        if seed.input_value() == "-7":
            break
        time.sleep(0.5)
    page.locator("#prompt textarea").fill("Describe the picture")
    page.locator("#send").click()
    toast = warnings(page).filter(has_text="eed")
    toast.first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    time.sleep(1.0)
    assert user_messages(page).count() == 0
    assert len(engine.handles) == sent
    assert error_badges(page) == 0
    assert page.locator("#prompt textarea").input_value() == "Describe the picture"
    page.close()


def test_5_temperature_typed_out_of_range_warns_sends_nothing_and_box_agrees_with_slider(browser, scripted):
    engine, url = scripted
    page = open_page(browser, url)
    sent = len(engine.handles)
    open_settings(page)
    box = page.locator("#temperature input[type=number]")
    box.fill("9")  # then straight to Send, as a user would
    page.locator("#prompt textarea").fill("Describe the picture")
    page.locator("#send").click()
    warnings(page).filter(has_text="emperature").first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    time.sleep(1.0)
    assert user_messages(page).count() == 0
    assert len(engine.handles) == sent
    assert error_badges(page) == 0
    typed = float(box.input_value())
    slider = page.locator("#temperature input[type=range]")
    ranged, lo, hi = (float(slider.get_attribute(a) if a != "value" else slider.input_value())
                      for a in ("value", "min", "max"))
    assert typed == pytest.approx(ranged), (typed, ranged)
    assert lo <= typed <= hi, (typed, lo, hi)
    page.close()


def test_8_refused_upload_sends_nothing_and_keeps_the_typed_text(browser, small_upload_limit, tmp_path):
    engine, url = small_upload_limit
    big = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (720, 720, 3), dtype=np.uint8)).save(big)
    assert 1.2 * 2**20 < big.stat().st_size < 2 * 2**20
    page = open_page(browser, url)
    sent = len(engine.handles)
    page.locator("#prompt input[type=file]").set_input_files(str(big))
    try:  # the page raises Gradio's own cap above the limit: the file lands in the box, refused at Send
        page.locator("#prompt img").first.wait_for(timeout=10_000)
    except Exception:
        pass  # refused at upload (old Gradio cap): the Send below must still send nothing
    page.locator("#prompt textarea").fill("What is in the image?")
    page.locator("#send").click()
    warnings(page).filter(has_text="MiB").first.wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    time.sleep(1.0)
    assert user_messages(page).count() == 0
    assert len(engine.handles) == sent
    assert page.locator("#prompt textarea").input_value() == "What is in the image?"
    page.close()


def test_9_copy_on_a_reply_copies_the_answer_not_the_reasoning(browser, scripted):
    url = scripted[1]
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
    page = open_page(browser, url, context=context)
    send(page, "Describe the picture", n_after=1)
    answer = page.locator('#chat [data-testid="bot"]').filter(has_text="There are three shapes.").last
    answer.hover()
    copy = page.locator("#chat").get_by_role("button", name="Copy message")
    copy.last.click()
    time.sleep(0.5)
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert "There are three shapes." in copied, copied
    assert "Let me look" not in copied and "Three shapes." not in copied, copied
    context.close()


def test_11_no_domain_line_without_a_model_card(browser, scripted):
    page = open_page(browser, scripted[1])
    title = page.locator("#title").inner_text()
    assert "scripted" in title and "Knows" not in title, title
    page.close()
