"""Issue 16's page defects that need real focus maps and routing: Playwright (Chromium) on the shipped demo
model (AutoGLM-Phone-Tiny, loaded once for the module; greedy, few new tokens, thinking off where it can be).

Defects 1 (focus bound to its image; multi-turn picker and text-only follow-ups), 4 (the Model tab's engine
speed), 6 ("max" caption never over 100 %), 7 (routing views), 11 (the card's domain in the title) and the
README screenshot (docs/screenshot.png, written only with AUTOGLM_WRITE_SCREENSHOT=1).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.ui.test_ui_browser import browser, demo_server, set_number  # noqa: F401 (fixtures)
from tests.ui.page_defects_helpers import (TURN_MS, bot_messages, heat_peak, open_settings, percentages, pick_radio,
                                           save, scene, send, shown_image, user_texts, wait_idle, wait_turns)

TIMEOUT_MS = 30_000
ROOT = Path(__file__).resolve().parents[2]
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "grey", "pink", "brown")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Turn 1's picture (a blue circle at the top left) and turn 2's (a red square at the bottom right)."""
    d = tmp_path_factory.mktemp("scenes")
    first, second = scene("circle", (40, 90, 220), "tl"), scene("square", (220, 40, 40), "br")
    return {"first": (first, save(first, d / "circle-top-left.png")),
            "second": (second, save(second, d / "square-bottom-right.png"))}


def open_page(browser, url: str, width: int = 1366, height: int = 768):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#send")
    wait_idle(page)
    return page


def set_box(page, elem_id: str, value) -> None:
    set_number(page, elem_id, value)


def greedy(page, max_tokens: int = 24, thinking: bool = False, seed: int = 1) -> None:
    """Temperature 0, a fixed seed, few new tokens, thinking on or off (Generation settings)."""
    open_settings(page)
    set_box(page, "temperature", 0)
    set_box(page, "max-tokens", max_tokens)
    set_box(page, "seed", seed)
    box = page.locator("#thinking input[type=checkbox]")
    if box.is_checked() != thinking:
        box.click()
    time.sleep(0.3)


def finished(page) -> None:
    """The shown turn's focus covers the whole reply: the turn has ended and its maps are drawn."""
    from playwright.sync_api import expect

    expect(page.locator("#focus-caption")).to_contain_text("whole", timeout=TURN_MS)
    wait_idle(page)


def test_1_each_turn_alone_turn_2s_heat_on_turn_2s_own_shape(browser, demo_server, scenes):
    page = open_page(browser, demo_server)
    greedy(page)
    send(page, "What is in the image?", [scenes["first"][1]], n_after=1)
    finished(page)
    x, y = heat_peak(shown_image(page), scenes["first"][0])
    assert x + y < 1.0, f"turn 1's heat peak at {(x, y)}: not on its top-left circle"
    send(page, "What is in the image?", [scenes["second"][1]], n_after=2)
    finished(page)
    x, y = heat_peak(shown_image(page), scenes["second"][0])
    assert x + y > 1.0, f"turn 2's heat peak at {(x, y)}: not in the bottom-right half, where its square is"
    # the demo model's card says single-turn: the page's default
    assert page.locator("#context-mode").get_by_label("each turn alone", exact=True).is_checked()
    page.close()


def test_1_multi_turn_lists_both_images_and_a_text_follow_up_shows_focus(browser, demo_server, scenes):
    from playwright.sync_api import expect

    page = open_page(browser, demo_server)
    greedy(page)
    pick_radio(page, "context-mode", "multi-turn")
    send(page, "What is in the image?", [scenes["first"][1]], n_after=1)
    finished(page)
    send(page, "What is in the image?", [scenes["second"][1]], n_after=2)
    finished(page)
    labels = [t.strip() for t in page.locator("#image-pick label").all_inner_texts()]
    assert "turn 1 · image 1" in labels and "image 1" in labels, labels
    send(page, "What color is the circle?", n_after=3)
    expect(page.locator("#focus-image img")).to_be_visible(timeout=TURN_MS)
    wait_idle(page)
    assert "no focus to show" not in page.locator("#focus-caption").inner_text()
    assert page.locator("#focus-image img").get_attribute("src")
    page.close()


def test_4_model_tab_shows_the_engines_decode_speed_and_time_to_first_token(browser, demo_server, scenes):
    from playwright.sync_api import expect

    page = open_page(browser, demo_server)
    greedy(page)
    send(page, "What is in the image?", [scenes["first"][1]], n_after=1)
    finished(page)
    page.get_by_role("tab", name="Model").click()
    panel = page.locator("#model-panel")
    expect(panel).to_contain_text("time to first token")
    expect(panel).to_contain_text("decode tokens / s (engine)")
    row = re.search(r"decode tokens / s \(engine\)\s*([0-9.]+)", panel.inner_text())
    assert row and float(row.group(1)) > 0, panel.inner_text()
    page.close()


def test_6_max_aggregation_caption_never_states_over_100_percent(browser, demo_server, scenes):
    page = open_page(browser, demo_server)
    greedy(page)
    send(page, "What is in the image?", [scenes["first"][1]], n_after=1)
    finished(page)
    page.get_by_text("Layers: aggregate the focus maps again").click()
    page.get_by_role("radio", name="max", exact=True).check()
    wait_idle(page)
    captions = [page.locator("#focus-caption").inner_text()]
    words = page.locator("#words span.token[role=button]")
    for i in range(min(words.count(), 8)):
        before = page.locator("#focus-caption").inner_text()
        words.nth(i).click()
        wait_idle(page)
        captions.append(page.locator("#focus-caption").inner_text())
        if captions[-1] == before:
            time.sleep(0.5)
            captions[-1] = page.locator("#focus-caption").inner_text()
    shares = [p for c in captions for p in percentages(c)]
    assert shares, captions
    assert max(shares) <= 100, captions
    page.close()


def balance(page) -> str:
    """The balance figures the Routing tab shows for the selected view (CV and entropy)."""
    text = page.locator("#routing").inner_text()
    line = re.search(r"CV.*", text)
    figures = page.locator("#routing td.fig").all_inner_texts()  # a table of per-layer CV / entropy
    return (line.group(0) if line else "") + " ".join(figures)


def test_7_routing_views_have_their_own_balance_audio_says_none_and_the_default_token_is_not_think(
        browser, demo_server):
    page = open_page(browser, demo_server)
    greedy(page, max_tokens=48, thinking=True)
    send(page, "What color is the triangle?", [str(ROOT / "assets/examples/scene3.png")], n_after=1)
    finished(page)
    page.get_by_role("tab", name="Routing").click()
    page.locator("#load-view").wait_for(state="visible")
    problems = []  # every sub-defect, so a failure names all that are wrong
    total = balance(page)
    token = page.locator("#token-routes").inner_text()
    if not token.strip() or "</think>" in token or "<think>" in token:
        problems.append(f"the token marked by default is a think tag (or none): {token!r}")
    pick_radio(page, "load-view", "decode")
    wait_idle(page)
    decode = balance(page)
    for _ in range(50):  # the tab redraws on its 0.2 s timer: give a loaded machine a few seconds
        if decode and decode != total:
            break
        page.wait_for_timeout(100)
        decode = balance(page)
    if not decode or decode == total:
        problems.append(f"the decode view's balance is the total view's: {total!r} vs {decode!r}")
    pick_radio(page, "load-view", "audio")
    wait_idle(page)
    shown = page.locator("#routing").inner_text()
    if "no audio tokens" not in shown:
        problems.append(f"the audio view of a turn without audio does not say so: {shown[:300]!r}")
    assert not problems, problems
    page.close()


def test_11_the_demo_models_domain_is_in_the_title(browser, demo_server):
    page = open_page(browser, demo_server)
    title = page.locator("#title").inner_text()
    assert "Knows: ShapesWorld only" in title, title
    page.close()


def test_readme_screenshot_shows_a_right_answer(browser, demo_server, artifacts):
    """The README's screenshot: the demo model on a shipped example whose answer can be checked."""
    examples = json.loads((ROOT / "assets/examples/examples.json").read_text(encoding="utf-8"))
    example = next(ex for ex in examples if ex["image"] == "scene3.png" and ex["task"] == "color")
    expected = [c for c in COLOURS if re.search(rf"\b{c}\b", example["answer"].lower())]
    assert expected, example
    page = open_page(browser, demo_server)
    greedy(page, max_tokens=64, thinking=True)
    page.locator("#examples").get_by_text(f"{example['image']}: {example['text']}").click()
    wait_turns(page, 1)
    finished(page)
    assert user_texts(page) == [example["text"]]
    answer = bot_messages(page).last.inner_text().lower()
    named = [c for c in COLOURS if re.search(rf"\b{c}\b", answer)]
    assert named == expected, (answer, expected)
    chips = page.locator("#words span.token[role=button]").filter(has_text=re.compile(expected[0]))
    if chips.count():
        chips.last.click()
        wait_idle(page)
    out = ROOT / "docs" / "screenshot.png" if os.environ.get("AUTOGLM_WRITE_SCREENSHOT") == "1" \
        else artifacts / "readme-screenshot.png"
    bot_messages(page).last.scroll_into_view_if_needed()  # the answer in view (the image above it)
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.5)
    page.screenshot(path=str(out))
    page.close()
