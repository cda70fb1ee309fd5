"""A request's timings -> its ``Stats``: one rule for the in-process engine and the remote backend.

``Timeline`` records when the first token came and when reasoning gave way to the answer, counting
the output pieces of each phase; ``timing_stats`` turns it, with the token counts, into ``Stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..events import Stats
from ..memory import peak_rss_bytes


@dataclass
class Timeline:
    """One request's milestones (``time.perf_counter`` seconds) and the pieces of output in each phase."""

    start: float
    first: float | None = None  # the first token (or chunk) arrived
    think_end: float | None = None  # the first answer piece after some reasoning
    reasoning: int = 0
    answer: int = 0

    def first_token(self, now: float) -> None:
        self.first = self.first or now

    def piece(self, phase: str, now: float) -> None:
        """One piece of output in ``phase`` arrived at ``now``."""
        self.first_token(now)
        if phase == "reasoning":
            self.reasoning += 1
            return
        self.answer += 1
        if self.think_end is None and self.reasoning:
            self.think_end = now


def _rate(tokens: int, seconds: float) -> float:
    """Tokens per second over an interval; 0 for fewer than two tokens (no interval to time)."""
    return tokens / max(seconds, 1e-9) if tokens > 1 else 0.0


def timing_stats(timeline: Timeline, end: float, *, reasoning_tokens: int, answer_tokens: int,
                 completion_tokens: int, prompt_tokens: int, finish_reason: str, attention: str,
                 peak_memory: dict[str, int]) -> Stats:
    """The request's Stats: time to first token and to the end of reasoning (from the start of work),
    and rates per phase. Without reasoning the answer ran from the first token; the overall rate
    counts the tokens after the first over the time after it."""
    first = timeline.first or end
    reasoning_end = timeline.think_end or (end if timeline.reasoning else first)
    return Stats(
        ttft_s=first - timeline.start,
        think_s=(timeline.think_end - timeline.start) if timeline.think_end else None,
        reasoning_tokens=reasoning_tokens,
        answer_tokens=answer_tokens,
        reasoning_tps=_rate(reasoning_tokens, reasoning_end - first),
        answer_tps=_rate(answer_tokens, end - reasoning_end),
        tokens_per_second=(completion_tokens - 1) / max(end - first, 1e-9) if completion_tokens > 1 else 0.0,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        queue_s=0.0,
        total_s=end - timeline.start,
        peak_memory=peak_memory,
        finish_reason=finish_reason,
        attention=attention,
    )


def peak_memory() -> dict[str, int]:
    """Peak bytes per CUDA device since the last reset, and the process's peak resident memory."""
    out = {f"cuda:{d}": int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count())}
    out["cpu"] = peak_rss_bytes()
    return out


def reset_peak_memory() -> None:
    """Start each CUDA device's peak from now (the process's RSS peak cannot be reset)."""
    for dev in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(dev)
