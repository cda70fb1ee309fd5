"""Trace import: a QA trace zip (``export.py``) back into the page, for review only.

``open_trace(path, limits)`` reads the zip (``trace_file.py``: the zip read safely, ``trace.json``'s format)
and returns the conversation it holds as page ``Turn``s (``ImportedTrace``); ``TraceImporter`` is the page's
side: the import control's handler, and the guard that keeps an imported conversation read-only.

What is read: ``trace.json``, the input images and recordings the turns' contexts name, and
``routed_experts.npy``. The heatmap PNGs are not read: the page draws the focus again from the maps in
``trace.json``, as it does for a live turn. What the export does not hold cannot come back: the per-layer
focus detail (a per-layer view then shows the model's default map, and says so), the versions of a turn
other than the one exported, the engine's running figures.

A file that cannot be imported is refused with a sentence that says why and what to do (``TraceRejected``):
besides the zip's and the format's own checks, media that do not decode or are over the page's limits, and
a trace whose turns the page's panels cannot draw. Everything is read, checked and drawn once before the
session is touched, so a refusal leaves the page as it was.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import shutil
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from ..config import Limits
from ..engine.inputs import open_image
from ..events import Alternative, Audio, BadRequest, Logprobs, Options, Routing, Stats
from .export import write_trace_zip
from .session import Session, Thread
from .trace_file import (MAX_TRACE_BYTES, Archive, LoadRecord, TraceRejected, TurnRecord, open_zip, parse_trace,
                         problem)
from .turn import MediaRef, TokenTrace, Turn

log = logging.getLogger(__name__)
_OPTIONS, _STATS = TypeAdapter(Options), TypeAdapter(Stats)

MAX_PIXELS = 120_000_000  # decoded pixels of all the trace's images together (each also within the page's limit)

READ_ONLY = ("This is an imported QA trace, shown for review only: nothing was sent. Press New chat to leave the "
             "review, then ask the model.")
IMPORT_HELP = ("**Review a trace.** Import a QA trace zip made here (Build QA trace): its chat, reasoning, focus "
               "(click a word) and routing come back read-only. New chat leaves the review.")

_IMAGE = re.compile(r"turn(\d{2,4})/input_image(\d{1,3})\.png")
_AUDIO = re.compile(r"turn(\d{2,4})/input_audio\.wav")


# ----------------------------------------------------------------------------- trace.json -> turns


@dataclass
class ImportedTrace:
    """A trace read back: the conversation as page turns (oldest first) and what the page says of it."""

    name: str
    model: dict
    exported_at: str
    turns: list[Turn]
    notes: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # media members, for the chat's copies


class _MediaReader:
    """Decodes the trace's media once each, within the page's limits and the import's pixel budget."""

    def __init__(self, archive: Archive, limits: Limits):
        self.archive, self.limits, self.pixels = archive, limits, 0
        self.images: dict[str, Image.Image] = {}
        self.audios: dict[str, Audio] = {}

    def image(self, name: str) -> Image.Image:
        if name not in self.images:
            if not _IMAGE.fullmatch(name):
                raise TraceRejected(f"trace.json names the image {name[:80]!r}, a file the export never writes.")
            data = self.archive.read(name)
            try:  # the header's size first: the pixels of all images together are bounded, not just each
                with Image.open(io.BytesIO(data)) as header:
                    self.pixels += header.width * header.height
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
                pass  # open_image says what is wrong with it
            if self.pixels > MAX_PIXELS:
                raise TraceRejected(f"The trace's images hold over {MAX_PIXELS:,} pixels together: too large to "
                                    "review here.")
            try:
                self.images[name] = open_image(data, self.limits.max_image_pixels)
            except BadRequest as e:
                raise TraceRejected(f"{name}: {e}.") from None
        return self.images[name]

    def audio(self, name: str) -> Audio:
        if name not in self.audios:
            if not _AUDIO.fullmatch(name):
                raise TraceRejected(f"trace.json names the recording {name[:80]!r}, a file the export never writes.")
            try:
                samples, rate = sf.read(io.BytesIO(self.archive.read(name)), dtype="float32")
            except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
                raise TraceRejected(f"{name} is not a readable WAV recording: import the export unmodified.") from None
            self.audios[name] = Audio(samples, int(rate))
        return self.audios[name]


def _maps(values: list, ndim: int, what: str) -> list[np.ndarray]:
    out = []
    for v in values:
        try:
            m = np.asarray(v, np.float32)
        except ValueError:
            raise TraceRejected(f"a focus map of {what} is not rectangular: import the export unmodified.") from None
        if m.ndim != ndim or m.size == 0:
            raise TraceRejected(f"a focus map of {what} has shape {m.shape}: import the export unmodified.")
        out.append(np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0))  # as traces.Coarse treats a bad engine's map
    return out


def _context(rec: TurnRecord, number: int, media: _MediaReader) -> tuple[list[MediaRef], list[MediaRef]]:
    images, audios = [], []
    for m in rec.context.images:
        found = _IMAGE.fullmatch(m.file)
        if found is None or int(found.group(1)) != m.from_turn or m.from_turn > number:
            raise TraceRejected(f"turn {number}'s context names {m.file[:80]!r} as from turn {m.from_turn}: import "
                                "the export unmodified.")
        images.append(MediaRef(m.label, m.from_turn, int(found.group(2)) - 1, m.own, image=media.image(m.file)))
    for m in rec.context.audios:
        if not _AUDIO.fullmatch(m.file) or m.from_turn > number:
            raise TraceRejected(f"turn {number}'s context names {m.file[:80]!r}: import the export unmodified.")
        audios.append(MediaRef(m.label, m.from_turn, 0, m.own, audio=media.audio(m.file)))
    return images, audios


def _turn(rec: TurnRecord, number: int, media: _MediaReader, archive: Archive) -> Turn:
    try:
        options = _OPTIONS.validate_python(rec.settings)
        stats = _STATS.validate_python(rec.stats) if rec.stats is not None else None
        load = LoadRecord.model_validate(rec.routing_load) if rec.routing_load is not None else None
    except ValidationError as e:
        raise TraceRejected(f"turn {number} of trace.json does not match the QA trace format at {problem(e)}: "
                            "import the export unmodified.") from None
    if load is not None and any(len(getattr(load, k)) != len(load.layers) or any(len(r) != load.experts
                                                                                  for r in getattr(load, k))
                                for k in ("prefill", "decode", "total")):
        raise TraceRejected(f"turn {number}'s routing load is not layers x experts: import the export unmodified.")
    images, audios = _context(rec, number, media)
    p = rec.prompt
    turn = Turn(text=p.text, images=[media.image(n) for n in p.images], audio=media.audio(p.audio) if p.audio else None,
                transcribed=p.audio_transcribed, options=options, system=rec.system,
                alone=rec.context_mode == "each turn alone", context_images=images, context_audios=audios,
                reasoning=rec.reasoning, answer=rec.answer, stats=stats, notices=list(rec.notices),
                error=rec.error, queue_position=0,
                # exported while it streamed: the trace holds it as far as it got
                finish_reason=rec.finish_reason or "cancelled", read_only=True)
    turn.image_paths, turn.audio_path = list(p.images), p.audio  # names in the zip; the page writes copies
    for t in rec.tokens:
        if t.index in turn.tokens:
            raise TraceRejected(f"turn {number} lists token {t.index} twice: import the export unmodified.")
        trace = turn.tokens[t.index] = TokenTrace(
            t.index, t.text, t.phase, images=_maps(t.focus.images, 2, f"turn {number}"),
            audios=_maps(t.focus.audios, 1, f"turn {number}"),
            routes=[(r.layer, list(r.experts), list(r.weights)) for r in t.routing])
        # a QA trace holds the shown maps only: a per-layer view falls back to them, and the caption says so
        trace.detail = "dropped" if trace.images or trace.audios else "full"
    last = max(turn.tokens.values(), key=lambda t: t.index) if turn.tokens else None
    if load is not None:
        turn.routing = Routing(last.index if last else 0, last.text if last else "", last.phase if last else "answer",
                               [], rec.routing_load)
        turn.prompt_experts = _prompt_experts(archive, number, len(turn.tokens), load)
    for t in rec.tokens:  # through the contract's record, so the page folds them as it does a live turn's
        if t.logprobs is not None:
            lp = t.logprobs
            turn.apply(Logprobs(t.index, lp.token, lp.token_id, lp.logprob, lp.entropy,
                                [Alternative(a.token, a.token_id, a.logprob) for a in lp.top], t.phase))
    if rec.branch is not None and rec.branch.continued_tokens:
        # the ids the branch was fed are its first tokens' (-1 where the trace has no logprobs for one): the
        # review never sends it, but its export says how many there were
        fed = [turn.tokens[i].token_id if i in turn.tokens else -1 for i in range(rec.branch.continued_tokens)]
        turn.continue_from, turn.branch_note = fed, rec.branch.note
    return turn


def _prompt_experts(archive: Archive, number: int, tokens: int, load: LoadRecord) -> np.ndarray | None:
    """The prompt's rows of ``routed_experts.npy`` (the prompt's tokens, then every generated one but the
    last), so an export of the review writes the same file; None when it is absent or does not fit."""
    name = f"turn{number:02d}/routed_experts.npy"
    if name not in archive.members:
        return None
    try:
        routed = np.load(io.BytesIO(archive.read(name)), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise TraceRejected(f"{name} is not a readable .npy array: import the export unmodified.") from None
    prompt = routed.shape[0] - max(tokens - 1, 0) if routed.ndim == 3 else 0
    if routed.dtype != np.int16 or routed.shape[1:] != (len(load.layers), load.top_k) or prompt < 1:
        return None
    return np.array(routed[:prompt])


def open_trace(path: str | Path, limits: Limits | None = None) -> ImportedTrace:
    """Read a QA trace zip into page turns, or raise ``TraceRejected`` saying why (nothing else happens)."""
    limits = limits or Limits()
    with open_zip(path) as archive:
        if "trace.json" not in archive.members:
            raise TraceRejected("The zip has no trace.json: import a zip made by Build QA trace.")
        trace = parse_trace(archive.read("trace.json", MAX_TRACE_BYTES))
        media = _MediaReader(archive, limits)
        turns = [_turn(rec, n, media, archive) for n, rec in enumerate(trace.turns, 1)]
        files = {n: archive.read(n) for n in (*media.images, *media.audios)}
    if not turns:
        raise TraceRejected("The trace holds no turns: there is nothing to review.")
    notes = [f"turn {n} was version {r.version} of {r.versions} (the trace holds that version only)"
             for n, r in enumerate(trace.turns, 1) if r.versions > 1]
    return ImportedTrace(Path(path).name, trace.model, trace.exported_at, turns, notes, files)


# ----------------------------------------------------------------------------- the page


@dataclass
class Review:
    """An imported trace shown in a session: read-only while the session's conversation is the imported one
    (New chat gives the session a new tree, which ends the review)."""

    name: str
    model: dict
    exported_at: str
    root: Thread
    notes: list[str]
    folder: Path | None = None  # the chat's copies of its media


def _plain(text: str) -> str:
    return re.sub(r"[`*_<>\[\]|\\]", "", str(text))[:120]


class TraceImporter:
    """The page's side of trace import: the Export tab's import control (``load``) and the guard that keeps an
    imported conversation read-only (``protect``).

    Sending while a trace is reviewed is refused with a warning, not turned into a new chat: a question typed
    under a conversation reads as a follow-up to it, which cannot be honoured (the trace is read-only and may
    come from another model or settings, and a live turn after it would make its next export claim one
    conversation of two origins); and starting a new chat silently would throw away what the QA user is
    examining on what may be a stray click. The warning says how to ask the model (New chat)."""

    def __init__(self, handlers: Any, status: Any):
        self.h, self.status = handlers, status
        self.directory = Path(tempfile.mkdtemp(prefix="autoglm-import-"))  # the chat's copies of the media
        self._reviews: dict[int, tuple[weakref.ref, Review]] = {}
        self._lock = threading.Lock()  # imports of several sessions run on their own Gradio threads

    def review(self, session: Session) -> Review | None:
        item = self._reviews.get(id(session))
        if item is None or item[0]() is not session or session.root is not item[1].root:
            return None
        return item[1]

    def outputs(self) -> list:
        """What an import updates: the chat, the turn picker, the panels, the Model tab, Export's file, the line."""
        p = self.h.page
        return [p.chatbot, p.turn_pick, *p.panel_outputs(), p.model_md, p.export_file, self.status]

    # ------------------------------------------------------------------ import
    def load(self, path: str | None, session: Session) -> dict:
        """The import control: the zip's conversation becomes the session's, shown read-only; a file that cannot
        be imported is a warning and the line says why, nothing else changes."""
        if not path:
            return {self.status: gr.skip()}
        if session.busy:
            gr.Warning("A reply is still streaming: wait for it or press Stop, then import the trace.")
            return {self.status: gr.skip()}
        folder = self.directory / uuid.uuid4().hex
        try:
            trace = open_trace(path, self.h.settings.limits)
            root = self._tree(trace, folder)
        except TraceRejected as e:
            shutil.rmtree(folder, ignore_errors=True)
            return self._refused(str(e))
        except Exception as e:  # a bug or an odd file no check foresaw: say so, keep the page as it was
            shutil.rmtree(folder, ignore_errors=True)
            log.exception("importing a QA trace failed")
            return self._refused(f"the page could not read it ({type(e).__name__}); nothing changed. Import a zip "
                                 "made by Build QA trace.")
        session.clear()  # as New chat: the conversation shown goes (and its focus detail leaves the budget)
        session.root = root
        with self._lock:
            self._forget_ended()  # the review this session had, if any, ended with the clear above
            self._reviews[id(session)] = (weakref.ref(session), Review(trace.name, trace.model, trace.exported_at,
                                                                        root, trace.notes, folder))
        self._count(session, trace.turns)
        gr.Info(f"Imported {trace.name}: {len(trace.turns)} turn{'s' if len(trace.turns) != 1 else ''}, read-only.")
        p, panels = self.h.page, self.h.panels
        session.sent = {}
        return {p.chatbot: session.history(), p.turn_pick: panels.turn_choices(session), **panels.all(session),
                p.model_md: self.h.model(session), p.export_file: gr.update(value=None, visible=False),
                self.status: self.status_text(session)}

    def _forget_ended(self) -> None:
        """Reviews whose session went or left them (New chat, another import): their media copies go too."""
        for key, (ref, review) in list(self._reviews.items()):
            session = ref()
            if session is None or session.root is not review.root:
                del self._reviews[key]
                if review.folder is not None:
                    shutil.rmtree(review.folder, ignore_errors=True)

    def _refused(self, why: str) -> dict:
        gr.Warning(f"Trace not imported: {why}")
        return {self.status: f"**Trace not imported.** {why}"}

    def _tree(self, trace: ImportedTrace, folder: Path) -> Thread:
        """The turns as a conversation (the exported path: one version each), their media copied where the chat
        can show them, and every turn drawn once by the page's own panels: what fails to draw is refused here,
        before the session changes."""
        copies = {}
        for name, data in trace.files.items():  # names that matched the export's own pattern (_MediaReader)
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            copies[name] = str(target)
        root = node = Thread()
        for turn in trace.turns:
            turn.image_paths = [copies[n] for n in turn.image_paths]
            turn.audio_path = copies[turn.audio_path] if turn.audio_path else None
            node.children.append(turn)
            node = turn
        trial = Session(root=root)
        for position in range(len(trace.turns)):
            trial.view = replace(trial.view, turn=position, word=None)
            try:
                trial.history()
                self.h.panels.all(trial)
            except Exception as e:  # the figures index into the trace's numbers: a shape no check caught
                log.warning("an imported trace's turn %d does not draw", position + 1, exc_info=True)
                raise TraceRejected(f"the page cannot draw turn {position + 1} of this trace ({type(e).__name__}): "
                                    "import the export unmodified.") from None
        return root

    @staticmethod
    def _count(session: Session, turns: list[Turn]) -> None:
        """The imported maps count against the page's trace memory as a live turn's shown maps do (they hold no
        per-layer detail; counting marks a token's detail whole, so each keeps its own flag)."""
        if session.traces is None:
            return
        for turn in turns:
            for index, trace in turn.tokens.items():
                flag = trace.detail
                session.traces.hold(session, turn, index)
                trace.detail = flag

    def status_text(self, session: Session) -> str:
        review = self.review(session)
        if review is None:
            return ""
        m = review.model
        model = f"`{_plain(m.get('model_id') or 'unknown model')}`" + (f" ({_plain(m['quantize'])})"
                                                                         if m.get("quantize") else "")
        n = len(session.turns)
        notes = "".join(f"  \n{_plain(note)}" for note in review.notes)
        return (f"**Reviewing `{_plain(review.name)}`** (read-only): {model}, exported {_plain(review.exported_at)}, "
                f"{n} turn{'s' if n != 1 else ''}. Click a word of a reply for its focus; the Routing tab shows its "
                "experts. A QA trace holds no per-layer focus detail: the Layers picker shows the model's default "
                f"map. **New chat** leaves the review.{notes}")

    # ------------------------------------------------------------------ read-only
    def protect(self, h: Any) -> None:
        """Wrap, on this page's ``Handlers`` (before its events are wired), the handlers a review changes: a new
        turn (Send, Regenerate, an edit, a branch from an alternative, the /send, /regenerate and /chat endpoints)
        is refused while the session reviews a trace; Export writes the reviewed trace with its own model's
        record; New chat and a reload update the review line. Every other session passes straight through."""
        h.trace_import = self  # the page's importer, for its tests and tools
        for name in ("send_page", "regenerate_page", "edit_page", "branch_page"):
            if hasattr(h, name):
                setattr(h, name, self._page_turn(getattr(h, name), edit=name == "edit_page"))
        for name in ("send", "regenerate"):
            setattr(h, name, self._streamed_turn(getattr(h, name)))
        h.api_chat, h.export = self._api_turn(h.api_chat), self._export(h.export)
        h.clear, h.restore = self._with_status(h.clear), self._with_status(h.restore)

    def _page_turn(self, fn, edit: bool):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            session = _session_of(args, kwargs)
            if self.review(session) is None:
                return fn(*args, **kwargs)
            gr.Warning(READ_ONLY)
            return {self.h.page.chatbot: session.history() if edit else gr.skip()}  # an edit is put back
        return guarded

    def _streamed_turn(self, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            if self.review(_session_of(args, kwargs)) is None:
                yield from fn(*args, **kwargs)
                return
            gr.Warning(READ_ONLY)
            yield {self.h.page.chatbot: gr.skip()}
        return guarded

    def _api_turn(self, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            if self.review(_session_of(args, kwargs)) is not None:
                raise gr.Error(READ_ONLY)
            yield from fn(*args, **kwargs)
        return guarded

    def _export(self, fn):
        @functools.wraps(fn)
        def guarded(session: Session):
            review = self.review(session)
            if review is None:
                return fn(session)
            return gr.update(value=str(write_trace_zip(session, review.model, self.h.export_dir)), visible=True)
        return guarded

    def _with_status(self, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            out = fn(*args, **kwargs)
            session = out.get(self.h.page.state) or _session_of(args, kwargs)
            return {**out, self.status: self.status_text(session)}
        return guarded


def _session_of(args: tuple, kwargs: dict) -> Session | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Session)), None)
