"""Per-token alternatives on the page: words coloured by probability, a clicked word's alternatives, and a
branch that continues the reply from a picked alternative as a new version (the original kept).

The unit half drives the Turn / Panels records directly; the browser half is a real Chromium on the demo model.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from autoglm_app.events import Alternative, Answer, Done, Logprobs, Options
from autoglm_app.ui import render
from autoglm_app.ui.panels import word_probabilities
from autoglm_app.ui.turn import Turn
from tests.ui.test_ui_browser import browser, demo_server, open_page, set_number, shoot  # noqa: F401 (fixtures)


def lp(index: int, text: str, token_id: int, p: float, alts: list[tuple[str, int, float]]) -> Logprobs:
    top = [Alternative(t, i, math.log(q)) for t, i, q in alts]
    return Logprobs(index, text, token_id, math.log(p), 0.5, top, "answer")


def folded_turn() -> Turn:
    turn = Turn(text="What is it?", options=Options(max_new_tokens=8))
    for e in [Answer("A"), lp(0, "A", 10, 0.95, [("A", 10, 0.95), ("The", 11, 0.03)]),
              Answer(" red"), lp(1, " red", 20, 0.4, [("blue", 21, 0.5), (" red", 20, 0.4), (" big", 22, 0.05)]),
              Answer(" square"), lp(2, " square", 30, 0.7, [(" square", 30, 0.7), (" box", 31, 0.2)]),
              Done("stop")]:
        turn.apply(e)
    return turn


def test_words_take_their_least_likely_tokens_band_and_keep_the_selection_colour():
    turn = folded_turn()
    words = turn.words()
    probs = word_probabilities(turn, words)
    assert [w.text.strip() for w in words] == ["A", "red", "square"]
    np.testing.assert_allclose(probs, [0.95, 0.4, 0.7])
    chips = render.word_chips(words, 2, probs)
    assert [label for _, label in chips] == ["p ≥ 90%", "p 20–50%", "selected"]
    assert [label for _, label in render.word_chips(words, None)] == ["answer"] * 3  # colours off: the phases
    assert all(label in render.WORD_COLORS for _, label in chips)


def test_a_branch_keeps_the_tokens_before_takes_the_alternative_and_leaves_the_original():
    turn = folded_turn()
    branch = turn.branch(1, 0)  # the most likely token at position 1 was "blue", not the emitted " red"
    assert branch.continue_from == [10, 21]
    assert sorted(branch.tokens) == [0, 1]
    assert branch.tokens[1].text == "blue" and branch.tokens[1].token_id == 21
    assert branch.tokens[1].logprob == pytest.approx(math.log(0.5))
    assert turn.tokens[1].text == " red" and turn.tokens[1].token_id == 20  # the original is untouched
    assert "“red” → “blue”" in branch.branch_note
    with pytest.raises(ValueError):
        turn.branch(1, 9)
    with pytest.raises(ValueError):
        Turn(text="x").branch(0, 0)


def test_the_page_colours_words_shows_alternatives_and_branches_from_one(browser, demo_server, artifacts):
    from playwright.sync_api import expect

    page = open_page(browser, demo_server, 1366, 900)
    page.get_by_text("Generation settings").first.click()
    set_number(page, "max-tokens", 24)
    set_number(page, "seed", 1)
    page.locator("#thinking input[type=checkbox]").uncheck()
    page.locator("#chat").get_by_text("What is in the image?").first.click()
    expect(page.locator("#focus-caption")).to_contain_text("whole", timeout=120_000)  # the turn has finished
    first_answer = page.locator('#chat [data-testid="bot"]').last.inner_text()

    page.locator("#colour-probs input[type=checkbox]").check()
    expect(page.locator("#probability-legend")).to_contain_text("How sure")
    words = page.locator("#words span.token[role=button]")
    assert words.count() >= 3
    styles = {words.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(words.count())}
    assert styles  # each word carries its band's colour

    words.nth(1).click()
    expect(page.locator("#alternatives table")).to_be_visible(timeout=15_000)
    expect(page.locator("#alternatives td.emitted").first).to_be_visible()
    options = page.locator("#alternative-pick label")
    expect(options.first).to_be_visible()
    picked = options.first.inner_text()
    options.first.click()
    shoot(page, artifacts, "ui-alternatives.png")
    page.locator("#branch").click()
    expect(page.locator("#version-pick")).to_be_visible(timeout=120_000)
    expect(page.locator("#focus-caption")).to_contain_text("whole", timeout=120_000)
    branched = page.locator('#chat [data-testid="bot"]').last.inner_text()
    chosen = picked.split("”")[0].lstrip("“").strip()
    assert chosen and chosen in branched
    assert branched != first_answer
    version = page.locator("#version-pick input")
    expect(version).to_have_value(re.compile(r"version 2 of 2 · branched at token 2"))
    shoot(page, artifacts, "ui-branch.png")

    # the original is one pick away, unchanged
    version.click()
    page.get_by_role("option", name=re.compile("version 1 of 2")).click()
    expect(page.locator('#chat [data-testid="bot"]').last).to_have_text(first_answer, timeout=15_000)
    page.close()

