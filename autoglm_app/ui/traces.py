"""The page's memory for per-layer focus detail: a budget, server-wide and per session, and the order in
which detail gives way when the budget is spent.

Each generated token's Focus event carries, besides the maps the page shows by default (the engine's
aggregation, ``TokenTrace.images`` / ``audios``), one (layers, ...) stack per image / recording: the
per-layer detail that the aggregation picker and the layer range re-aggregate. At real size (40 layers x
2,700 patches, float16) that is about 216 KB a token, so it is the part that is bounded. The shown maps
always stay.

``TraceBudget`` (one per page, from ``--trace-memory-mb``) counts what the page's sessions hold of their
focus traces, in total and per session: the per-layer stacks exactly (``ndarray.nbytes``), and what never
gives way, also counted: each token's shown maps (``nbytes``) and its record (``RECORD_BYTES``). So the
detail gets what the rest leaves, and the traces stay within the budget until the shown maps alone would
fill it. When a new token takes a session over its share (a quarter of the budget) or the server over the
budget, detail gives way in this order, one token at a time, until both fit again:

  1. whose:  the session over its share gives way alone; over the server-wide budget, the least recently
             used session first (a turn streamed, or the page reloaded, is a use);
  2. which:  within a session, its finished turns (every version) oldest first; the turn being streamed
             comes last, after every finished turn of every session;
  3. how:    within a turn, each token's detail is first coarsened, oldest token first: float16 to uint8
             with a per-layer offset and scale (``Coarse``, half the bytes, every layer kept); once every
             token of that turn is coarse, the coarse detail is dropped, oldest token first.

A turn keeps what gave way in ``TraceDetail`` (counts and the budget's size), which the Focus caption and
the QA export read. New chat takes the old turns off the count (their detail dropped at once); the session
store's eviction drops a session's detail (its tab, if still open, keeps the shown maps, counted until
Gradio lets go of the session); a session Gradio let go of is taken off at the next count. Memory that
detail frees goes back to the system too (``return_free_memory``, every ``TRIM_EVERY`` bytes).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..memory import return_free_memory

# ``Turn`` / ``TokenTrace`` (ui/turn.py, which imports this module) are typed ``Any`` here
Turn = TokenTrace = Any

MiB = 2**20
SESSION_SHARE = 0.25  # one session may hold this much of the server-wide budget
# a token's record besides its maps (TokenTrace, its lists, the maps' array headers, its text, its slot in the
# turn): about 0.8 KiB measured with tracemalloc; counted with the shown maps, as it never gives way either
RECORD_BYTES = 1024
TRIM_EVERY = 8 * MiB  # detail given way between two returns of the heap's free pages to the system


@dataclass(frozen=True, slots=True)
class Coarse:
    """A (layers, ...) stack at 8 bits: ``q * scale + low`` per layer; half the bytes of float16."""

    q: np.ndarray  # uint8, the stack's shape
    low: np.ndarray  # float32 (layers,)
    scale: np.ndarray  # float32 (layers,)

    @classmethod
    def of(cls, stack: np.ndarray) -> Coarse:
        x = cast(stack, np.float32)
        if not np.isfinite(x.sum()):  # a bad map from a bad engine: its non-finite cells count as 0
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        x = x.reshape(1) if x.ndim == 0 else x
        n = x.shape[0]
        flat = x.reshape(n, -1) if x.size else np.zeros((n, 0), np.float32)
        low = flat.min(axis=1) if flat.shape[1] else np.zeros(n, np.float32)
        span = flat.max(axis=1) - low if flat.shape[1] else np.zeros(n, np.float32)
        scale = np.where(span > 0, span / 255.0, 1.0).astype(np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        q = np.rint((x - low.reshape(shape)) / scale.reshape(shape)).clip(0, 255).astype(np.uint8)
        return cls(q, low.astype(np.float32), scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.low.nbytes + self.scale.nbytes)

    def restore(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return self.q.astype(np.float32) * self.scale.reshape(shape) + self.low.reshape(shape)


def as_float32(stack: np.ndarray | Coarse) -> np.ndarray:
    """A stored per-layer stack (float16, or coarse) as float32 for aggregation."""
    return stack.restore() if isinstance(stack, Coarse) else cast(stack, np.float32)


def cast(a: Any, dtype: type) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` of its own (so its ``nbytes`` is what it holds). numpy's
    float16 <-> float32 casts take about 100x longer on subnormal values, which attention maps are full of
    (measured: 450 vs 4 us for a 40 x 576 stack), so torch's CPU cast does those: bit-identical."""
    x = np.asarray(a)
    if x.dtype == dtype and x.base is None and x.flags.c_contiguous:
        return x
    halves = (np.float16, np.float32)
    torch = _torch()
    if torch is not None and x.dtype in halves and dtype in halves and x.dtype != dtype \
            and x.flags.c_contiguous and x.flags.writeable:
        out = np.empty(x.shape, dtype)  # numpy's memory (torch's own allocations fragmented the heap: measured)
        torch.from_numpy(out).copy_(torch.from_numpy(x))
        return out
    return np.array(x, dtype, order="C")


@functools.cache
def _torch():
    try:
        import torch
    except ImportError:  # torch is a dependency; numpy's cast still works without it
        return None
    return torch


def detail_bytes(trace: TokenTrace) -> int:
    return int(sum(m.nbytes for m in trace.per_layer_images) + sum(m.nbytes for m in trace.per_layer_audios))


def shown_bytes(trace: TokenTrace) -> int:
    return int(sum(m.nbytes for m in trace.images) + sum(m.nbytes for m in trace.audios))


@dataclass
class TraceDetail:
    """One turn's per-layer focus detail: the bytes it holds, and what of it gave way and why."""

    held: int = 0  # bytes of per-layer stacks held now (what gives way)
    kept: int = 0  # bytes that never give way: the shown maps and the tokens' records
    layers: int = 0  # layers of the stacks (0: none seen)
    full: deque = field(default_factory=deque)  # token indices whose detail is whole, oldest first
    coarse: deque = field(default_factory=deque)  # ... kept at 8 bits, oldest first
    coarsened: int = 0  # tokens whose detail was coarsened (dropped ones included)
    dropped: int = 0  # tokens whose detail was dropped
    limit_mb: float | None = None  # the budget that made detail give way
    closed: bool = False  # its session left the store: new detail is not kept (the shown maps are)
    gone: bool = False  # it left its session (New chat): nothing of it is kept or counted

    @property
    def gave_way(self) -> bool:
        return bool(self.coarsened or self.dropped)


# ----------------------------------------------------------------------------- one turn's detail

def count_token(turn: Turn, index: int) -> tuple[int, int]:
    """Count what ``Turn.apply`` just stored for token ``index``: (change in detail bytes, in kept bytes:
    its shown maps and its record). A closed turn keeps no detail; a gone one counts nothing."""
    trace, ledger = turn.tokens.get(index), turn.detail
    if trace is None:
        return 0, 0
    if ledger.gone:
        _drop(trace)
        return 0, 0
    kept = shown_bytes(trace) + RECORD_BYTES
    kept_delta, trace.kept = kept - trace.kept, kept
    ledger.kept += kept_delta
    before = trace.held
    if ledger.closed:
        _drop(trace)
        ledger.held -= before
        return -before, kept_delta
    trace.held, trace.detail = detail_bytes(trace), "full"
    ledger.held += trace.held - before
    if trace.held:
        ledger.full.append(index)
        stacks = trace.per_layer_images or trace.per_layer_audios
        ledger.layers = ledger.layers or (int(stacks[0].shape[0]) if stacks and stacks[0].ndim else 0)
    return trace.held - before, kept_delta


def give_way(turn: Turn) -> int | None:
    """One step of the turn's order: coarsen its oldest whole token, else drop its oldest coarse one.
    Returns the bytes freed (possibly 0), or None when the turn holds no detail any more."""
    ledger = turn.detail
    while ledger.full:
        trace = turn.tokens.get(ledger.full.popleft())
        if trace is None or trace.detail != "full" or not trace.held:
            continue
        trace.per_layer_images = [Coarse.of(m) for m in trace.per_layer_images]
        trace.per_layer_audios = [Coarse.of(m) for m in trace.per_layer_audios]
        before, trace.held, trace.detail = trace.held, detail_bytes(trace), "coarse"
        ledger.coarse.append(trace.index)
        ledger.coarsened += 1
        ledger.held -= before - trace.held
        return before - trace.held
    while ledger.coarse:
        trace = turn.tokens.get(ledger.coarse.popleft())
        if trace is None or trace.detail != "coarse":
            continue
        freed = trace.held
        _drop(trace)
        ledger.dropped += 1
        ledger.held -= freed
        return freed
    return None


def close(turn: Turn) -> int:
    """Drop every token's detail and keep none from now on; returns the detail bytes freed."""
    ledger, freed = turn.detail, 0
    ledger.closed = True
    for trace in list(turn.tokens.values()):
        if trace.held or trace.per_layer_images or trace.per_layer_audios:
            freed += trace.held
            ledger.dropped += bool(trace.held)
            _drop(trace)
    ledger.full.clear()
    ledger.coarse.clear()
    ledger.held -= freed
    return freed


def _drop(trace: TokenTrace) -> None:
    trace.per_layer_images, trace.per_layer_audios = [], []
    if trace.held or trace.detail != "full":
        trace.detail = "dropped"
    trace.held = 0


# ----------------------------------------------------------------------------- what the page says

def selection_detail(turn: Turn, indices: list[int]) -> tuple[int, int, int]:
    """(tokens with focus maps, those whose detail is coarse, those whose detail was dropped) of a selection."""
    mapped = coarse = dropped = 0
    for i in indices:
        t = turn.tokens.get(i)
        if t is None or not (t.images or t.audios):
            continue
        mapped += 1
        coarse += t.detail == "coarse"
        dropped += t.detail == "dropped"
    return mapped, coarse, dropped


def _flag(turn: Turn) -> str:
    mb = turn.detail.limit_mb
    return f"--trace-memory-mb {mb:g}" if mb is not None else "the page's trace memory"


def detail_note(turn: Turn, indices: list[int]) -> tuple[str, bool]:
    """What the Focus caption must say when a per-layer view (aggregation, layer range) is asked of the
    selected tokens and some of their detail gave way: (the sentence, or "" when all is whole; True when
    no selected token has detail left, so the model's default map is what is drawn)."""
    mapped, coarse, dropped = selection_detail(turn, indices)
    if not mapped or not (coarse or dropped):
        return "", False
    if turn.read_only:  # an imported QA trace: the export keeps the shown maps only, no budget was involved
        return "a QA trace holds no per-layer detail (only the maps shown); showing the model's default map", True
    flag, ledger = _flag(turn), turn.detail
    if dropped == mapped:
        all_gone = not ledger.full and not ledger.coarse  # no token of the turn has detail left
        who = "this turn" if all_gone else "this token" if mapped == 1 else "these tokens"
        return (f"per-layer detail of {who} was dropped to stay within {flag}; showing the model's default "
                f"map"), True
    parts = []
    if dropped:
        parts.append(f"per-layer detail of {dropped} of the {mapped} tokens shown was dropped to stay within "
                     f"{flag}; those tokens show the model's default map")
    if coarse:
        what = "this turn" if coarse == mapped else f"{coarse} of the {mapped} tokens shown"
        parts.append(f"per-layer detail of {what} was coarsened to 8 bits to stay within {flag}")
    return "; ".join(parts), False


def turn_manifest(turn: Turn) -> dict:
    """The QA export's account of a turn's per-layer detail (the export itself carries the shown maps)."""
    traced = [t for t in turn.tokens.values() if t.images or t.audios]
    ledger = turn.detail
    coarse = sum(t.detail == "coarse" for t in traced)
    dropped = sum(t.detail == "dropped" for t in traced)
    note = ""
    if coarse or dropped:
        note = (f"to stay within {_flag(turn)}, the per-layer detail of {coarse} tokens is kept at 8 bits and of "
                f"{dropped} tokens was dropped (oldest first); every token's shown (aggregated) maps are kept")
    return {"tokens_with_focus": len(traced), "whole": len(traced) - coarse - dropped, "coarsened": coarse,
            "dropped": dropped, "bytes_held": int(ledger.held), "budget_mb": ledger.limit_mb, "note": note}


# ----------------------------------------------------------------------------- the budget

@dataclass(eq=False)
class _Entry:
    """One session's part of the budget: its turns with focus, in the order they started."""

    ref: Any  # weakref to the Session
    turns: list = field(default_factory=list)
    held: int = 0  # detail bytes
    kept: int = 0  # bytes that never give way (shown maps, records)


class TraceBudget:
    """The bytes of focus traces held by the page's sessions, and the order in which their per-layer detail
    gives way (the module's docstring): ``held`` (detail) + ``kept`` (shown maps, records) within ``limit``,
    and within ``session_limit`` per session. One per page, shared by every session of its ``SessionStore``;
    thread-safe (each session's turn streams on its own Gradio thread)."""

    def __init__(self, limit_mb: float = 512.0, session_share: float = SESSION_SHARE):
        self.limit_mb = float(limit_mb)
        self.limit = max(int(self.limit_mb * MiB), 0)
        self.session_limit = int(self.limit * session_share)
        self.held = 0  # detail bytes, all sessions
        self.kept = 0  # bytes that never give way, all sessions: the shown maps and the tokens' records
        self.coarsened = 0  # tokens coarsened since start, all sessions
        self.dropped = 0  # tokens whose detail was dropped since start
        self._given = 0  # detail bytes given way since the heap's free pages last went back (TRIM_EVERY)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id(session), least recently used first
        self._gone: deque[int] = deque()  # sessions garbage-collected since the last count
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> TraceBudget:  # a copied session still counts against the one budget
        return self

    # ------------------------------------------------------------------ sessions
    def join(self, session: Any) -> None:
        """Count this session's maps from now on (idempotent); it becomes the most recently used."""
        with self._lock:
            self._collect()
            self._entry(session)
            session.traces = self

    def _entry(self, session: Any) -> _Entry:
        key = id(session)
        entry = self._entries.get(key)
        if entry is None or entry.ref() is not session:
            if entry is not None:  # a stale entry under a reused id
                self._count(entry, -entry.held, -entry.kept)
            entry = self._entries[key] = _Entry(weakref.ref(session, lambda _, k=key: self._gone.append(k)))
        self._entries.move_to_end(key)
        return entry

    def touch(self, session: Any) -> None:
        with self._lock:
            if id(session) in self._entries:
                self._entries.move_to_end(id(session))

    def release(self, session: Any) -> None:
        """New chat: the session's turns so far leave it; their detail goes and nothing of them is counted."""
        with self._lock:
            entry = self._entries.get(id(session))
            if entry is None or entry.ref() is not session:
                return
            self._close_turns(entry, shown_too=True)
            entry.turns.clear()
            self._trim(now=True)

    def leave(self, session: Any) -> None:
        """The session left the store (evicted or expired): the detail of its turns so far goes. Its tab, if
        still open, keeps the shown maps, so they stay counted until Gradio lets go of the session; a turn it
        sends later is counted as any other."""
        with self._lock:
            entry = self._entries.get(id(session))
            if entry is None or entry.ref() is not session:
                return
            self._close_turns(entry, shown_too=False)
            self._entries.move_to_end(id(session), last=False)
            self._trim(now=True)

    def _close_turns(self, entry, shown_too: bool) -> None:
        """The detail of every turn of ``entry`` goes; with ``shown_too`` its shown maps stop being counted as well
        (New chat), else they stay counted (the tab may still show them)."""
        for turn in entry.turns:
            freed = close(turn)
            self._given += freed
            if shown_too:
                self._count(entry, -freed, -turn.detail.kept)
                turn.detail.gone, turn.detail.kept = True, 0
            else:
                self._count(entry, -freed, 0)
                turn.detail.limit_mb = self.limit_mb

    # ------------------------------------------------------------------ tokens
    def hold(self, session: Any, turn: Turn, index: int) -> None:
        """Count token ``index``'s maps, which ``turn.apply`` just stored; then make everything fit."""
        with self._lock:
            self._collect()
            if turn.detail.gone:
                count_token(turn, index)  # a turn that left its session: nothing kept, nothing counted
                return
            entry = self._entries.get(id(session))
            if entry is None or entry.ref() is not session:
                self.join(session)
                entry = self._entries[id(session)]
            if not (entry.turns and entry.turns[-1] is turn) and not any(t is turn for t in entry.turns):
                entry.turns.append(turn)
            held, kept = count_token(turn, index)
            self._count(entry, held, kept)
            self._given += abs(held)  # new detail leaves holes too, between the engine's passing arrays
            self._entries.move_to_end(id(session))
            self._fit(entry)
            self._trim()

    def _fit(self, entry: _Entry) -> None:
        while entry.held + entry.kept > self.session_limit:  # the session over its share: its own detail
            if not (self._step(entry, running=False) or self._step(entry, running=True)):
                break
        for running in (False, True):  # the server over its budget: least recently used first
            for other in list(self._entries.values()):
                while self.held + self.kept > self.limit:
                    if not self._step(other, running):
                        break
                if self.held + self.kept <= self.limit:
                    return

    def _step(self, entry: _Entry, running: bool) -> bool:
        """One token of the entry's oldest turn with detail (finished ones, or the streaming one) gives way."""
        for turn in list(entry.turns):
            if turn.running != running:
                continue
            ledger = turn.detail
            if not (ledger.full or ledger.coarse):
                continue
            coarsened, dropped = ledger.coarsened, ledger.dropped
            freed = give_way(turn)
            if freed is None:
                continue
            ledger.limit_mb = self.limit_mb
            self.coarsened += ledger.coarsened - coarsened
            self.dropped += ledger.dropped - dropped
            self._count(entry, -freed, 0)
            self._given += freed
            return True
        return False

    def _trim(self, now: bool = False) -> None:
        """Once ``TRIM_EVERY`` bytes of detail have gone (or at once after New chat / an eviction), give the
        heap's free pages back, so that what gave way leaves the process's resident memory too."""
        if self._given >= TRIM_EVERY or (now and self._given):
            self._given = 0
            return_free_memory()

    def _count(self, entry: _Entry, held: int, kept: int) -> None:
        entry.held += held
        entry.kept += kept
        self.held += held
        self.kept += kept

    def _collect(self) -> None:
        """Take the sessions Gradio let go of (garbage-collected) off the count."""
        while self._gone:
            key = self._gone.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.ref() is None:
                self.held -= entry.held
                self.kept -= entry.kept
                del self._entries[key]

    # ------------------------------------------------------------------ reading
    def session_held(self, session: Any) -> int:
        """Detail bytes the session holds."""
        with self._lock:
            entry = self._entries.get(id(session))
            return entry.held if entry is not None and entry.ref() is session else 0

    def summary(self) -> dict:
        """Figures for the benchmark and the logs: bytes held, sessions, tokens whole / coarse now."""
        with self._lock:
            self._collect()
            whole = coarse = 0
            for entry in self._entries.values():
                for turn in entry.turns:
                    for i in turn.detail.full:
                        whole += turn.tokens.get(i) is not None and turn.tokens[i].detail == "full"
                    for i in turn.detail.coarse:
                        coarse += turn.tokens.get(i) is not None and turn.tokens[i].detail == "coarse"
            return {"limit_bytes": self.limit, "session_limit_bytes": self.session_limit,
                    "detail_bytes": self.held, "kept_bytes": self.kept, "sessions": len(self._entries),
                    "tokens_whole": whole, "tokens_coarse": coarse, "tokens_coarsened_total": self.coarsened,
                    "tokens_dropped_total": self.dropped}
