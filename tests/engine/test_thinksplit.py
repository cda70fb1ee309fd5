"""The reasoning/answer split, fed the way a token stream arrives: in arbitrary pieces."""

from __future__ import annotations

import pytest

from autoglm_app.engine.thinksplit import ThinkSplitter


def split(pieces: list[str], thinking: bool = True) -> tuple[str, str]:
    s = ThinkSplitter(thinking)
    out = []
    for p in pieces:
        out += s.feed(p)
    out += s.finish()
    reasoning = "".join(t for phase, t in out if phase == "reasoning")
    answer = "".join(t for phase, t in out if phase == "answer")
    return reasoning, answer


def every_cut(text: str) -> list[list[str]]:
    return [[text[:i], text[i:j], text[j:]] for i in range(len(text)) for j in range(i, len(text))]


def test_whole_tags_split_reasoning_from_answer():
    assert split(["<think>I see a red circle.</think>The circle is red."]) == (
        "I see a red circle.",
        "The circle is red.",
    )


@pytest.mark.parametrize("pieces", every_cut("<think>ab</think>\nok"))
def test_tags_cut_anywhere_across_pieces(pieces):
    assert split(pieces) == ("ab", "ok")


def test_character_by_character_stream():
    text = "<think>look: < and </ are not tags</think>Answer <b>bold</b>"
    assert split(list(text)) == ("look: < and </ are not tags", "Answer <b>bold</b>")


def test_closing_tag_never_comes_keeps_everything_as_reasoning():
    assert split(["<think>still thinking when the budget ran o", "ut</"]) == (
        "still thinking when the budget ran out</",
        "",
    )


def test_model_skipping_thinking_is_all_answer():
    assert split(["The", " circle", " is red."]) == ("", "The circle is red.")


def test_leading_whitespace_before_think_tag():
    assert split(["\n", " <th", "ink>r</think>a"]) == ("r", "a")


def test_thinking_switched_off_treats_everything_as_answer():
    # the chat template already closed an empty think block in the prompt
    assert split(["Red", "."], thinking=False) == ("", "Red.")
    assert split(["<think></think>Red."], thinking=False) == ("", "Red.")


def test_glm_answer_wrapper_is_removed():
    assert split(["<think>r</think><ans", "wer>The answer</answ", "er>"]) == ("r", "The answer")


def test_prefix_of_open_tag_that_is_not_a_tag_becomes_answer():
    assert split(["<th", "ree shapes>"]) == ("", "<three shapes>")


def test_nothing_generated():
    assert split([]) == ("", "")
    assert split(["<think>"]) == ("", "")
