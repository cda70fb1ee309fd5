"""One browser session's state: its conversation (a tree of turns), what the panels show, and the
loop that sends a turn to the engine and folds its events in.

A ``Session`` lives in a ``gr.State`` (one per browser tab, never a module global); ``SessionStore``
keeps them by a random key the browser holds, so a reload finds its conversation again. The
conversation is the path through the tree that follows each turn's chosen version (``turns``);
Regenerate and an edited question add a version (``start_version``), and ``choose`` switches to
another one, later turns following it.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ..events import BadRequest, ChatRequest, EngineBusy, Focus, Message
from .traces import TraceBudget
from .turn import THINKING_TITLE, MediaRef, TokenTrace, Turn, as_sentence  # noqa: F401  (re-exported)

CONTEXT_MODES = ("each turn alone", "multi-turn")


@dataclass
class View:
    """What the Focus and Routing panels show; changed by the panel controls."""

    turn: int | None = None  # index into Session.turns; None = the latest
    word: int | None = None  # index into the turn's words; None = live token / whole answer
    image: int | None = None  # index into the shown turn's context images; None = its own first (or the newest)
    audio: int | None = None  # the same for recordings
    colormap: str = "inferno"
    opacity: float = 0.55
    aggregation: str = "default"
    layers: tuple[int, int] | None = None
    known_layers: int = 0  # decoder layers the focus maps have (the sliders' range)
    load_view: str = "total"
    experts: tuple[int, int] | None = None  # the routing figure's expert range [from, to); None = all
    moe_layers: tuple[int, int] | None = None  # and its layer range (rows)
    known_routing: tuple[int, int] | None = None  # (MoE layers, experts) the look-closer sliders are set for
    tab: str = "focus"  # the panel tab the browser shows (only it redraws while a reply streams)
    probabilities: bool = False  # colour the reply's words by how sure the model was of them

    def fresh(self) -> View:
        """The same display choices for a new conversation (nothing selected)."""
        return View(colormap=self.colormap, opacity=self.opacity, aggregation=self.aggregation, layers=self.layers,
                    known_layers=self.known_layers, load_view=self.load_view, experts=self.experts,
                    moe_layers=self.moe_layers, known_routing=self.known_routing, tab=self.tab,
                    probabilities=self.probabilities)


@dataclass
class Thread:
    """The root of the conversation tree: the first turn's versions."""

    children: list[Turn] = field(default_factory=list)
    chosen: int = 0


_CLAIM_LOCK = threading.Lock()  # makes "is a turn in flight? if not, mine" one step across sessions' threads


@dataclass
class Session:
    root: Thread = field(default_factory=Thread)
    view: View = field(default_factory=View)
    multi_turn: bool = False  # send earlier turns with each question (else each turn alone)
    handle: Any = None  # the engine's RequestHandle of the running turn
    pending: Any = None  # a handle submitted by the page's start event, not yet followed by its stream event
    transcribed: str | None = None  # fingerprint of the recording last transcribed into the text box
    claimed: bool = False  # a Send / Regenerate is being made into a turn or is streaming
    key: str = ""  # the SessionStore key the browser keeps (empty until stored)
    sent: dict = field(default_factory=dict, repr=False)  # what the page shows now, by component (skip repeats)
    traces: TraceBudget | None = field(default=None, repr=False)  # counts its per-layer focus detail (None: unbounded)

    # ------------------------------------------------------------------ the conversation
    @property
    def turns(self) -> list[Turn]:
        """The conversation as shown: from the first turn, each turn's chosen version."""
        path, node = [], self.root
        while node.children:
            node = node.children[min(node.chosen, len(node.children) - 1)]
            path.append(node)
        return path

    def _parent(self, position: int):
        return self.root if position == 0 else self.turns[position - 1]

    def versions(self, position: int) -> tuple[int, int]:
        """(chosen version, number of versions) of the turn at ``position``."""
        parent = self._parent(position)
        return min(parent.chosen, max(len(parent.children) - 1, 0)), len(parent.children)

    def choose(self, position: int, version: int) -> None:
        """Follow another version of the turn at ``position`` (later turns follow that version's)."""
        parent = self._parent(position)
        if 0 <= version < len(parent.children):
            parent.chosen = version
            self.view.turn, self.view.word, self.view.image, self.view.audio = position, None, None, None

    def start(self, turn: Turn) -> None:
        """Add ``turn`` after the last one and make it the one the panels show."""
        self.start_version(turn, len(self.turns))

    def start_version(self, turn: Turn, position: int) -> tuple:
        """Add ``turn`` as a new version of the turn at ``position`` (or a new last turn) and follow it.
        Returns what ``discard`` needs to take it back (the engine refused it)."""
        earlier = self.turns[:position]
        if not turn.continue_from:  # a branch is sent as its original was (Turn.branch), whatever the setting now
            turn.alone = not self.multi_turn
        number = position + 1
        images, audios = [], []
        if not turn.alone:
            for n, t in enumerate(earlier, 1):
                if t.ok:
                    own_images, own_audios = t.own_media(n)
                    images += own_images
                    audios += own_audios
        images += [MediaRef(f"image {k + 1}", number, k, True, image=im) for k, im in enumerate(turn.images)]
        if turn.sends_audio:
            audios.append(MediaRef("recording", number, 0, True, audio=turn.audio))
        turn.context_images, turn.context_audios = images, audios
        parent = self.root if position == 0 else earlier[-1]
        undo = (parent, turn, parent.chosen, self.view)
        parent.children.append(turn)
        parent.chosen = len(parent.children) - 1
        self.view = replace(self.view, turn=None, word=None, image=None, audio=None)
        return undo

    def discard(self, undo: tuple) -> None:
        """Take back a turn ``start_version`` added: the conversation is as it was before."""
        parent, turn, chosen, view = undo
        parent.children = [t for t in parent.children if t is not turn]
        parent.chosen, self.view = chosen, view

    def engine_messages(self) -> list[Message]:
        """The conversation for the newest turn: its system prompt, the earlier turns that finished well
        (multi-turn only), then the newest."""
        turns = self.turns
        last = turns[-1]
        messages = [Message("system", last.system)] if last.system.strip() else []
        if not last.alone:
            for turn in turns[:-1]:
                if turn.ok:
                    messages += [turn.user_message(), Message("assistant", turn.answer)]
        return messages + [last.user_message()]

    def history(self) -> list[dict]:
        return [m for turn in self.turns for m in turn.chat_messages()]

    def message_turns(self) -> list[int]:
        """For each message of ``history()``: the position of the turn it belongs to."""
        return [n for n, turn in enumerate(self.turns) for _ in turn.chat_messages()]

    # ------------------------------------------------------------------ one turn in flight
    def claim(self) -> bool:
        """Take the session for one new turn; False when one is already in flight (e.g. a double click)."""
        with _CLAIM_LOCK:
            if self.busy:
                return False
            self.claimed = True
            return True

    def release(self) -> None:
        self.claimed = False

    @property
    def busy(self) -> bool:
        if self.claimed:
            return True
        turns = self.turns
        return bool(turns) and turns[-1].running and self.handle is not None

    def cancel(self) -> bool:
        """Stop the running request (the engine stops within one token). True when one was running."""
        handle = self.handle
        if handle is None:
            return False
        handle.cancel()
        return True

    def clear(self) -> None:
        """A new chat: the conversation goes, the display choices stay."""
        self.cancel()
        self.pending = None
        if self.traces is not None:  # the old turns' per-layer detail goes, and leaves the budget's count
            self.traces.release(self)
        self.root = Thread()
        self.transcribed = None
        self.sent = {}
        self.view = self.view.fresh()

    # ------------------------------------------------------------------ panel selection
    def shown_turn(self) -> Turn | None:
        turns = self.turns
        if not turns:
            return None
        i = self.view.turn
        return turns[i] if i is not None and 0 <= i < len(turns) else turns[-1]

    def shown_position(self) -> int | None:
        turns = self.turns
        if not turns:
            return None
        i = self.view.turn
        return i if i is not None and 0 <= i < len(turns) else len(turns) - 1

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


class SessionStore:
    """Sessions by the random key each browser keeps (``gr.BrowserState``), so a page reload finds its
    conversation, focus and routing again while the server runs. Bounded: the least recently used
    session goes first, and one idle longer than ``idle_s`` is dropped. Its sessions share one ``traces``
    budget for their focus traces; a session that leaves the store has its per-layer detail dropped (its
    tab, if still open, keeps the shown maps, counted until Gradio lets the session go)."""

    def __init__(self, max_sessions: int = 64, idle_s: float = 24 * 3600, traces: TraceBudget | None = None):
        self.max_sessions, self.idle_s = max_sessions, idle_s
        self.traces = traces if traces is not None else TraceBudget()
        self._items: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> Session | None:
        with self._lock:
            self._expire()
            item = self._items.get(key) if isinstance(key, str) and key else None
            if item is None:
                return None
            self._items[key] = (item[0], time.monotonic())
            self._items.move_to_end(key)
            self.traces.touch(item[0])
            return item[0]

    def put(self, session: Session) -> str:
        with self._lock:
            if not session.key:
                session.key = secrets.token_urlsafe(18)
            self._items[session.key] = (session, time.monotonic())
            self._items.move_to_end(session.key)
            self.traces.join(session)
            while len(self._items) > self.max_sessions:
                _, (gone, _) = self._items.popitem(last=False)
                self.traces.leave(gone)
            return session.key

    def touch(self, session: Session) -> None:
        """A turn of this session starts: it is the most recently used (kept longest, its detail last to go)."""
        with self._lock:
            if session.key in self._items and self._items[session.key][0] is session:
                self._items[session.key] = (session, time.monotonic())
                self._items.move_to_end(session.key)
        self.traces.join(session)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, seen) in self._items.items() if now - seen > self.idle_s]:
            self.traces.leave(self._items.pop(key)[0])

    def __len__(self) -> int:
        return len(self._items)


# ----------------------------------------------------------------------------- talking to the engine

CHAT_EVERY_S = 0.1  # redraw the chat at most this often while tokens stream
PANELS_EVERY_S = 0.2  # the shown panel tab redraws this often while a reply streams (the target: 4 Hz or more)


def stream_turn(engine, session: Session, session_id: str, chat_every: float = CHAT_EVERY_S,
                panels_every: float = PANELS_EVERY_S, handle: Any = None) -> Iterator[bool]:
    """Send the session's newest turn (or follow ``handle``, already submitted) and fold its events in.

    Yields whenever the page should redraw: True when the panels should redraw too
    (throttled to ``panels_every``), False for the chat only. Submit-time refusals
    (busy, bad request) become the turn's error. Closing this generator early (the
    browser went away) cancels the request.
    """
    turn = session.turns[-1]
    if handle is None:
        try:
            handle = submit(engine, session, session_id)
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
            if session.traces is not None and isinstance(event, Focus):
                session.traces.hold(session, turn, event.index)
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


def submit(engine, session: Session, session_id: str):
    """Submit the session's newest turn; the engine's refusals (EngineBusy, BadRequest) propagate."""
    turn = session.turns[-1]
    return engine.submit(ChatRequest(session.engine_messages(), turn.options, session_id,
                                     continue_from=list(turn.continue_from)))


def request_session_id(request: Any) -> str:
    """The engine's session id for a page request: Gradio's session hash (one per browser tab)."""
    return getattr(request, "session_hash", None) or "ui"
