"""One browser session's state: its turns with every event they received, and what the panels show.

A ``Session`` lives in a ``gr.State`` (one per browser tab, never a module global).
Each ``Turn`` folds the engine's events into plain records (text, per-token focus and
routing, stats) with ``apply``; the chat history, the focus selection and the export
are all read from those records, so a finished turn stays explorable without the engine.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..events import (
    Answer,
    Audio,
    BadRequest,
    ChatRequest,
    Done,
    EngineBusy,
    Error,
    Event,
    Focus,
    Message,
    Notice,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
    aggregate_layers,
)
from .words import Word, merge_words

THINKING_TITLE = "Thinking"

Route = tuple[int, list[int], list[float]]  # (layer, experts, gate weights)


@dataclass
class TokenTrace:
    """What one generated token looked at and which experts it went to."""

    index: int
    text: str
    phase: str
    images: list[np.ndarray] = field(default_factory=list)  # (rows, cols) each, the engine's aggregation
    audios: list[np.ndarray] = field(default_factory=list)  # (frames,) each
    per_layer_images: list[np.ndarray] = field(default_factory=list)  # (layers, rows, cols)
    per_layer_audios: list[np.ndarray] = field(default_factory=list)  # (layers, frames)
    routes: list[Route] = field(default_factory=list)


@dataclass
class Turn:
    """One user turn and the model's reply, as the events built it."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    audio: Audio | None = None
    audio_path: str | None = None
    transcribed: bool = False  # the recording became the text (model does not hear): shown, not sent
    options: Options = field(default_factory=Options)
    reasoning: str = ""
    answer: str = ""
    tokens: dict[int, TokenTrace] = field(default_factory=dict)
    load: dict | None = None
    stats: Stats | None = None
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    finish_reason: str | None = None
    queue_position: int | None = None
    think_started: float | None = None
    think_ended: float | None = None

    # ------------------------------------------------------------------ events in
    def apply(self, event: Event) -> bool:
        """Fold one event in. Returns True when the page should refresh at once (not throttled)."""
        if isinstance(event, Queued):
            self.queue_position = event.position
            return True
        if isinstance(event, Notice):
            self.notices.append(event.message)
            return True
        if isinstance(event, Reasoning):
            first = self.think_started is None
            if first:
                self.think_started = time.perf_counter()
            self.reasoning += event.text
            return first
        if isinstance(event, Answer):
            first = not self.answer
            if self.think_started is not None and self.think_ended is None:
                self.think_ended = time.perf_counter()
            self.answer += event.text
            return first
        if isinstance(event, Focus):
            trace = self._token(event.index, event.token, event.phase)
            trace.images = [np.asarray(m, np.float32) for m in event.images]
            trace.audios = [np.asarray(m, np.float32) for m in event.audios]
            trace.per_layer_images = [np.asarray(m, np.float16) for m in event.per_layer_images]
            trace.per_layer_audios = [np.asarray(m, np.float16) for m in event.per_layer_audios]
            return False
        if isinstance(event, Routing):
            trace = self._token(event.index, event.token, event.phase)
            trace.routes = [(r.layer, list(r.experts), list(r.weights)) for r in event.layers]
            self.load = event.load
            return False
        if isinstance(event, Stats):
            self.stats = event
            if self.think_started is not None and self.think_ended is None:
                self.think_ended = time.perf_counter()
            return True
        if isinstance(event, Done):
            self.finish_reason = event.finish_reason
            self.queue_position = 0
            return True
        if isinstance(event, Error):
            self.fail(as_sentence(event.message), event.kind)
            return True
        return False

    def fail(self, message: str, kind: str = "internal") -> None:
        self.error = message
        self.finish_reason = "cancelled" if kind == "cancelled" else "error"
        if self.think_started is not None and self.think_ended is None:
            self.think_ended = time.perf_counter()

    def _token(self, index: int, text: str, phase: str) -> TokenTrace:
        trace = self.tokens.get(index)
        if trace is None:
            trace = self.tokens[index] = TokenTrace(index, text, phase)
        return trace

    # ------------------------------------------------------------------ reading
    @property
    def running(self) -> bool:
        return self.finish_reason is None

    @property
    def ok(self) -> bool:
        """Finished without an error: its answer is part of the conversation sent next time."""
        return self.finish_reason is not None and self.error is None

    def think_seconds(self) -> float | None:
        if self.think_started is None:
            return None
        end = self.think_ended if self.think_ended is not None else time.perf_counter()
        return round(end - self.think_started, 2)

    def words(self) -> list[Word]:
        return merge_words([(t.index, t.text, t.phase) for t in sorted(self.tokens.values(), key=lambda t: t.index)])

    def has_focus(self) -> bool:
        return any(t.images or t.audios for t in self.tokens.values())

    def num_focus_layers(self) -> int:
        for t in self.tokens.values():
            for m in t.per_layer_images + t.per_layer_audios:
                return int(m.shape[0])
        return 0

    def focus_map(self, indices: list[int], kind: str, i: int, rule: str = "default",
                  layers: tuple[int, int] | None = None) -> np.ndarray | None:
        """Mean focus of the given tokens on image / recording ``i`` (None when none has one): the engine's
        own maps for ``rule`` "default", else the per-layer maps aggregated by the contract's rule over
        ``layers`` (which must lie within the stack: the page clamps its slider range first)."""
        maps = []
        for idx in indices:
            t = self.tokens.get(idx)
            if t is None:
                continue
            aggregated = t.images if kind == "image" else t.audios
            per_layer = t.per_layer_images if kind == "image" else t.per_layer_audios
            if rule != "default" and i < len(per_layer):
                maps.append(aggregate_layers(per_layer[i].astype(np.float32), rule, layers))
            elif i < len(aggregated):
                maps.append(aggregated[i])
        return np.mean(maps, axis=0) if maps else None

    @property
    def sends_audio(self) -> bool:
        """The recording goes to the model (not when it was transcribed into the text instead)."""
        return self.audio is not None and not self.transcribed

    def user_message(self) -> Message:
        return Message("user", self.text, list(self.images), [self.audio] if self.sends_audio else [])

    # ------------------------------------------------------------------ chat history
    def chat_messages(self) -> list[dict]:
        """This turn in the Chatbot's messages format: user parts, then queue / thinking / answer."""
        out: list[dict] = []
        if self.text:
            out.append({"role": "user", "content": self.text})
        for path in self.image_paths:
            out.append({"role": "user", "content": {"path": path}})
        if self.audio_path:
            out.append({"role": "user", "content": {"path": self.audio_path}})
        if self.running and self.queue_position:
            ahead = self.queue_position
            out.append({"role": "assistant",
                        "content": f"Waiting for the model: {ahead} request{'s' if ahead != 1 else ''} ahead of you.",
                        "metadata": {"title": "In queue", "status": "pending"}})
        if self.reasoning or self.think_started is not None:
            thinking = self.running and self.think_ended is None
            meta: dict[str, Any] = {"title": THINKING_TITLE, "status": "pending" if thinking else "done"}
            seconds = self.think_seconds()
            if not thinking and self.stats is not None and self.stats.think_s is not None:
                seconds = round(self.stats.think_s, 2)
            if seconds is not None:
                meta["duration"] = seconds
            out.append({"role": "assistant", "content": self.reasoning.strip() or "…", "metadata": meta})
        for note in self.notices:
            out.append({"role": "assistant", "content": note, "metadata": {"title": "Note"}})
        answer = self.answer
        if self.finish_reason == "cancelled" and not self.error:
            answer = (answer + "\n\n" if answer else "") + "*(stopped)*"
        elif self.ok and not answer:
            answer = ("*(no answer: the model used all its new tokens while thinking; raise max new tokens)*"
                      if self.reasoning else "*(empty answer)*")
        if answer:
            out.append({"role": "assistant", "content": answer})
        if self.error:
            out.append({"role": "assistant", "content": f"**Error:** {self.error}"})
        return out


@dataclass
class View:
    """What the Focus and Routing panels show; changed by the panel controls."""

    turn: int | None = None  # index into Session.turns; None = the latest
    word: int | None = None  # index into the turn's words; None = live token / whole answer
    image: int = 0
    colormap: str = "inferno"
    opacity: float = 0.55
    aggregation: str = "default"
    layers: tuple[int, int] | None = None
    known_layers: int = 0  # decoder layers the focus maps have (the sliders' range)
    load_view: str = "total"


_CLAIM_LOCK = threading.Lock()  # makes "is a turn in flight? if not, mine" one step across sessions' threads


@dataclass
class Session:
    turns: list[Turn] = field(default_factory=list)
    view: View = field(default_factory=View)
    handle: Any = None  # the engine's RequestHandle of the running turn
    transcribed: str | None = None  # fingerprint of the recording last transcribed into the text box
    claimed: bool = False  # a Send / Regenerate is being made into a turn or is streaming

    def claim(self) -> bool:
        """Take the session for one new turn; False when one is already in flight (e.g. a double click)."""
        with _CLAIM_LOCK:
            if self.busy:
                return False
            self.claimed = True
            return True

    def release(self) -> None:
        self.claimed = False

    def history(self) -> list[dict]:
        return [m for turn in self.turns for m in turn.chat_messages()]

    def engine_messages(self) -> list[Message]:
        """The conversation for the newest turn: earlier turns that finished well, then the newest."""
        messages: list[Message] = []
        for turn in self.turns[:-1]:
            if turn.ok:
                messages += [turn.user_message(), Message("assistant", turn.answer)]
        return messages + [self.turns[-1].user_message()]

    def start(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.view.turn, self.view.word, self.view.image = None, None, 0

    @property
    def busy(self) -> bool:
        return self.claimed or (bool(self.turns) and self.turns[-1].running and self.handle is not None)

    def cancel(self) -> bool:
        """Stop the running request (the engine stops within one token). True when one was running."""
        handle = self.handle
        if handle is None:
            return False
        handle.cancel()
        return True

    def clear(self) -> None:
        self.cancel()
        self.turns.clear()
        self.transcribed = None
        v = self.view
        self.view = View(colormap=v.colormap, opacity=v.opacity, aggregation=v.aggregation, layers=v.layers,
                         known_layers=v.known_layers, load_view=v.load_view)

    # ------------------------------------------------------------------ panel selection
    def shown_turn(self) -> Turn | None:
        if not self.turns:
            return None
        i = self.view.turn
        return self.turns[i] if i is not None and 0 <= i < len(self.turns) else self.turns[-1]

    def selection(self, turn: Turn) -> tuple[list[int], str]:
        """Which tokens the panels show, and how to say it.

        A clicked word wins; otherwise the newest token while streaming, then the whole answer.
        """
        words = turn.words()
        if self.view.word is not None and self.view.word < len(words):
            w = words[self.view.word]
            return w.tokens, f"“{w.text.strip()}”"
        ordered = sorted(turn.tokens)
        if not ordered:
            return [], ""
        if turn.running:
            last = turn.tokens[ordered[-1]]
            return [last.index], f"the newest token “{last.text.strip()}” (live)"
        answer = [i for i in ordered if turn.tokens[i].phase == "answer"]
        if answer:
            return answer, "the whole answer (click a word)"
        return ordered, "the whole reply (click a word)"


# ----------------------------------------------------------------------------- talking to the engine

CHAT_EVERY_S = 0.05  # redraw the chat at most this often while tokens stream
PANELS_EVERY_S = 0.25  # and the focus / routing panels at most this often


def stream_turn(engine, session: Session, session_id: str, chat_every: float = CHAT_EVERY_S,
                panels_every: float = PANELS_EVERY_S) -> Iterator[bool]:
    """Send the session's newest turn and fold its events in as they come.

    Yields whenever the page should redraw: True when the panels should redraw too
    (throttled to ``panels_every``), False for the chat only. Submit-time refusals
    (busy, bad request) become the turn's error. Closing this generator early (the
    browser went away) cancels the request.
    """
    turn = session.turns[-1]
    request = ChatRequest(session.engine_messages(), turn.options, session_id)
    try:
        handle = engine.submit(request)
    except EngineBusy as e:
        turn.fail(f"{as_sentence(str(e))} (try again in about {math.ceil(e.retry_after)} s)", "busy")
        yield True
        return
    except BadRequest as e:
        turn.fail(as_sentence(str(e)), "bad_request")
        yield True
        return
    session.handle = handle
    events = handle.events()
    last_chat = last_panels = 0.0
    try:
        for event in events:
            urgent = turn.apply(event)
            now = time.monotonic()
            if urgent or now - last_chat >= chat_every:
                full = urgent or now - last_panels >= panels_every
                last_chat = now
                last_panels = now if full else last_panels
                yield full
    finally:
        events.close()
        session.handle = None
        if turn.running:  # the stream ended without Done/Error: it was cut off
            turn.finish_reason = "cancelled"
    yield True


def as_sentence(message: str) -> str:
    message = message.strip()
    return message[:1].upper() + message[1:] if message else "Something went wrong"
