"""Split a streamed completion into reasoning (inside <think>...</think>) and answer.

Text arrives in arbitrary pieces, so a tag may be cut anywhere ("<thi" + "nk>"): any
tail that could still become a tag is held back until the next piece decides it.
Handles: the model skipping thinking (first non-blank text is not "<think>"), the
closing tag never coming (everything stays reasoning), thinking switched off (the
prompt already closed the block, so we start in the answer), a chat template that opens the
block in the prompt itself (Qwen3 Thinking-2507, QwQ, GLM-4.7: the output starts inside the
reasoning and only closes it, so we start in the reasoning; ``opened`` wins over ``thinking``,
since the prompt is what the model continues), and GLM's extra ``<answer>...</answer>`` wrapper,
which is removed from the answer.
"""

from __future__ import annotations

from typing import Literal

Phase = Literal["reasoning", "answer"]


class ThinkSplitter:
    def __init__(
        self,
        thinking: bool = True,
        open_tag: str = "<think>",
        close_tag: str = "</think>",
        answer_tags: tuple[str, str] = ("<answer>", "</answer>"),
        opened: bool = False,
    ):
        self.open_tag, self.close_tag = open_tag, close_tag
        self.answer_tags = answer_tags
        # "start": not yet known whether the model opens a think block; ``opened``: the prompt did.
        self.state: Literal["start", "reasoning", "answer"] = (
            "reasoning" if opened else "start" if thinking else "answer")
        self.pending = ""
        self.answer_started = False

    @property
    def phase(self) -> Phase:
        return "reasoning" if self.state == "reasoning" else "answer"

    def feed(self, text: str) -> list[tuple[Phase, str]]:
        """Consume a delta; return the (phase, text) pieces that are now certain."""
        self.pending += text
        out: list[tuple[Phase, str]] = []
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(self.open_tag):
                    self.pending = stripped[len(self.open_tag) :]
                    self.state = "reasoning"
                    continue
                if stripped and not self.open_tag.startswith(stripped):
                    self.state = "answer"  # the model skipped thinking
                    continue
                return out  # blank or a prefix of "<think>": wait
            if self.state == "reasoning":
                idx = self.pending.find(self.close_tag)
                if idx >= 0:
                    self._emit(out, "reasoning", self.pending[:idx])
                    self.pending = self.pending[idx + len(self.close_tag) :]
                    self.state = "answer"
                    continue
                keep = _partial_suffix(self.pending, (self.close_tag,))
                self._emit(out, "reasoning", self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return out
            # answer: drop GLM's <answer> wrapper and any stray empty think block
            tags = (*self.answer_tags, self.open_tag + self.close_tag)
            for tag in tags:
                if tag in self.pending:
                    self.pending = self.pending.replace(tag, "")
            keep = _partial_suffix(self.pending, tags)
            text_now = self.pending[: len(self.pending) - keep]
            if not self.answer_started:
                text_now = text_now.lstrip()  # the newline after </think> is layout, not answer
                if text_now:
                    self.answer_started = True
            self._emit(out, "answer", text_now)
            self.pending = self.pending[len(self.pending) - keep :]
            return out

    def finish(self) -> list[tuple[Phase, str]]:
        """End of generation: release what was held back."""
        out: list[tuple[Phase, str]] = []
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            self._emit(out, "reasoning", rest)
        elif self.state == "answer" or rest.strip():
            text = rest if self.answer_started else rest.lstrip()
            self._emit(out, "answer", text)
        return out

    @staticmethod
    def _emit(out: list, phase: Phase, text: str) -> None:
        if text:
            out.append((phase, text))


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:n]):
                best = max(best, n)
                break
    return best
