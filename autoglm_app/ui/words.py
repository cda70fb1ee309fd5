"""Generated tokens -> the clickable words of a reply (shared by the session and the renderer).

A ``Word`` is a run of consecutive tokens of one phase; ``merge_words`` decides where one word
ends and the next begins. Plain data in, plain data out: no Gradio, no rendering.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

THINK_TAGS = {"<think>", "</think>", "<answer>", "</answer>"}


@dataclass
class Word:
    """Consecutive generated tokens shown as one clickable word."""

    text: str
    phase: str  # "reasoning" | "answer"
    tokens: list[int] = field(default_factory=list)  # generated-token indices


def _is_cjk(ch: str) -> bool:
    return bool(ch) and unicodedata.east_asian_width(ch) in ("W", "F")


def merge_words(tokens: list[tuple[int, str, str]]) -> list[Word]:
    """(index, text, phase) tokens in order -> words.

    A token starts a new word when it begins with whitespace, follows whitespace,
    changes phase, or is a wide (CJK) character; punctuation and word pieces join the
    word before them. Think tags are markup, not words, and are left out.
    """
    words: list[Word] = []
    for index, text, phase in tokens:
        if text.strip() in THINK_TAGS:
            continue
        prev = words[-1] if words else None
        if prev is not None and prev.phase == phase and (text == "" or _continues(prev.text, text)):
            prev.text += text
            prev.tokens.append(index)
        else:
            words.append(Word(text, phase, [index]))
    return [w for w in words if w.text.strip()]  # a lone newline is layout, not a word


def _continues(before: str, token: str) -> bool:
    if not before or before[-1].isspace() or token[0].isspace():
        return False
    if unicodedata.category(token[0]).startswith("P"):
        return True  # punctuation belongs to the word before it
    return not (_is_cjk(token[0]) or _is_cjk(before[-1]))  # each CJK character is a word
