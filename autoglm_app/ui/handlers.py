"""The page's event handlers: each turns one user action into component updates.

Chat handlers make a ``Turn`` from the inputs (``inputs.py``), let ``session.stream_turn`` fold the
engine's events into the session, and yield the chat plus the panels (``panels.py``) as it streams.
Panel handlers change the session's ``View`` and redraw. Only ``engine.submit`` (through
``stream_turn``) and ``engine.transcribe`` are called: never the model.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import Settings
from ..events import BadRequest, EngineBusy, Options
from .export import write_trace_zip
from .inputs import Controls, InputError, fingerprint, file_path, make_options, make_turn, read_audio, recording_of
from .panels import Capabilities, Page, Panels, model_panel
from .live import LiveTurns, plain_values
from .session import CONTEXT_MODES, Session, SessionStore, Turn, as_sentence, stream_turn, submit
from .session import request_session_id as _session_id
from .traces import TraceBudget

log = logging.getLogger(__name__)

NO_EARS = ("This model does not hear recordings, and no speech-to-text model is set up: type your question "
           "instead.")




class Handlers(LiveTurns):
    """The handlers of one page, bound to its engine, settings and output components."""

    def __init__(self, engine: Any, settings: Settings, caps: Capabilities, page: Page, examples: list[dict]):
        self.engine, self.settings, self.caps, self.page, self.examples = engine, settings, caps, page, examples
        self.panels = Panels(page, caps)
        # the per-layer focus detail of every session of this page, within --trace-memory-mb (ui/traces.py)
        self.traces = TraceBudget(settings.trace_memory_mb)
        self.sessions = SessionStore(traces=self.traces)
        self.export_dir = Path(tempfile.mkdtemp(prefix="autoglm-export-"))

    # ------------------------------------------------------------------ chat
    def send(self, prompt: dict | None, recording: str | None, thinking: bool, temperature: float, top_p: float, max_new_tokens: float, seed: float | None,
             top_k: float = 0, repetition_penalty: float = 1.0, stop: str | None = None, system: str | None = None,
             context_mode: str | None = None, typed: str | None = None,
             session: Session = None, request: gr.Request = None):
        """Send what is in the inputs as a new turn and stream the reply into the page (the /send endpoint)."""
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)
        turn = self._new_turn(session, controls, self._typed(prompt, recording, session))
        if turn is None:
            yield self._refused(controls)
            return
        yield from self._run(session, turn, len(session.turns), request, clear_inputs=True, controls=controls)

    def regenerate(self, thinking: bool, temperature: float, top_p: float, max_new_tokens: float, seed: float | None,
             top_k: float = 0, repetition_penalty: float = 1.0, stop: str | None = None, system: str | None = None,
             context_mode: str | None = None, typed: str | None = None,
                   session: Session = None, request: gr.Request = None):
        """Ask again: the last turn's inputs with the current settings, as a new version of it (the earlier
        versions stay, in the Versions picker)."""
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)

        turn = self._new_turn(session, controls, self._again(session))
        if turn is None:
            yield self._refused(controls)
            return
        yield from self._run(session, turn, len(session.turns) - 1, request, clear_inputs=False, controls=controls)

    def _typed(self, prompt: dict | None, recording: str | None, session: Session) -> Callable[[Options], Turn]:
        """How to make a new turn of what is in the inputs (the box's text and files, the recording)."""
        prompt = prompt or {}
        return lambda options: self.speech(make_turn(prompt.get("text", ""), prompt.get("files", []), recording,
                                                     options, self.settings), session)

    @staticmethod
    def _again(session: Session) -> Callable[[Options], Turn]:
        def again(options: Options) -> Turn:
            if not session.turns:
                raise InputError("Nothing to regenerate yet: send a message first.")
            return session.turns[-1].again(options=options)
        return again

    @staticmethod
    def _edited(session: Session, evt) -> tuple[int | None, Callable[[Options], Turn]]:
        """The position of the edited question's turn, and how to make its new version."""
        owners = session.message_turns()
        index = getattr(evt, "index", None)
        index = index if isinstance(index, int) else (index[0] if isinstance(index, (list, tuple)) and index else -1)
        position = owners[index] if 0 <= index < len(owners) else None
        text = getattr(evt, "value", None)
        text = text if isinstance(text, str) else None

        def edited(options: Options) -> Turn:
            history = session.history()
            if position is None or text is None or not text.strip() or history[index].get("role") != "user" \
                    or not isinstance(history[index].get("content"), str):
                raise InputError("Only the text of a question can be edited: send a new message instead.")
            return session.turns[position].again(text=text.strip(), options=options)
        return position, edited

    @staticmethod
    def _branched(session: Session, alternative: int | None) -> tuple[int | None, Callable[[Options], Turn]]:
        """The position of the shown turn, and how to make its branch from the clicked word's first token."""
        position, turn = session.shown_position(), session.shown_turn()

        def branched(options: Options) -> Turn:
            words = turn.words() if turn is not None else []
            word = session.view.word
            if turn is None or word is None or word >= len(words):
                raise InputError("Click a word of a reply first, then pick one of its alternatives.")
            if turn.running:
                raise InputError("The reply is still streaming: wait for it to finish, then branch.")
            if alternative is None:
                raise InputError("Pick an alternative to continue from.")
            try:
                return turn.branch(words[word].tokens[0], int(alternative), options)
            except ValueError as e:
                raise InputError(f"{as_sentence(str(e))}.") from e
        return position, branched

    def _start(self, session: Session, turn: Turn, position: int, request: gr.Request | None, clear_inputs: bool,
               controls: Controls | None, timers: bool = True) -> tuple[dict, object]:
        """Submit the new turn: (the first full update, with the panel timer on for the page path, and the
        engine's handle), or, when the engine refuses, (a warning and nothing sent, the inputs keeping what
        the user typed; None)."""
        p = self.page
        try:
            undo = session.start_version(turn, position)
            try:
                handle = session.handle = submit(self.engine, session, _session_id(request))
            except (EngineBusy, BadRequest) as e:
                session.discard(undo)
                wait = f" (try again in about {math.ceil(e.retry_after)} s)" if isinstance(e, EngineBusy) else ""
                gr.Warning(f"{as_sentence(str(e))}{wait}. Nothing was sent.")
                return self._refused(controls), None
        finally:
            session.release()  # from here the handle keeps the session busy
        session.sent = {}
        first = {p.chatbot: session.history(), p.turn_pick: self.panels.turn_choices(session),
                 **self.panels.all(session), **(self.timers(session, True) if timers else {})}
        if clear_inputs:
            first.update({p.prompt: gr.update(value=None), p.mic: None})
        return plain_values(session, first), handle

    def _new_turn(self, session: Session, controls: Controls, make: Callable[[Options], Turn]) -> Turn | None:
        """The new turn, or None (with a warning) when the session already has one in flight (a double
        click on Send) or the inputs cannot be used. A returned turn holds the session's claim: ``_start``
        releases it."""
        if not session.claim():
            gr.Warning("A reply is still streaming: wait for it or press Stop.")
            return None
        self.sessions.touch(session)  # its focus detail counts against the page's budget, newest use
        try:
            turn = make(controls.options())
            if not turn.continue_from:  # a branch keeps its original's system prompt (and context: Turn.branch)
                turn.system = (controls.system or "").strip()
            session.multi_turn = controls.multi_turn(session)
            return turn
        except InputError as e:
            session.release()
            gr.Warning(str(e))
            return None
        except BaseException:
            session.release()
            raise

    def _refused(self, controls: Controls | None) -> dict:
        """Nothing was sent: the inputs keep what the user typed; a slider's box that holds an out-of-range
        value is set back to the slider's own value, so box and slider agree."""
        out = {self.page.chatbot: gr.skip()}
        if controls is not None:
            for component, value in zip(self.page.settings, controls.sliders()):
                out[component] = gr.update(value=value)
        return out

    def _run(self, session: Session, turn: Turn, position: int, request: gr.Request | None, clear_inputs: bool,
             controls: Controls | None = None):
        """The named endpoints' single streaming event: ``_start``, then the chat and panels as they stream."""
        p = self.page
        first, handle = self._start(session, turn, position, request, clear_inputs, controls, timers=False)
        yield first
        if handle is None:
            return
        try:
            with closing(stream_turn(self.engine, session, _session_id(request), handle=handle)) as stream:
                try:
                    for full in stream:
                        update = {p.chatbot: session.history()}
                        if full:
                            update.update(self.panels.all(session))
                        yield plain_values(session, update)
                except Exception as e:  # a bug in the page: say so plainly, keep the page usable
                    log.exception("streaming a turn failed")
                    turn.fail(f"The page failed to show this reply ({type(e).__name__}); try again.")
        finally:
            if turn.running:  # the page went away before the turn ended
                turn.finish_reason = "cancelled"
        if turn.error:
            gr.Warning(turn.error)
        session.sent = {}
        yield {p.chatbot: session.history(), p.turn_pick: self.panels.turn_choices(session),
               **self.panels.all(session), p.model_md: self.model(session)}

    def api_chat(self, text: str, images: list | None, audio: str | None, thinking: bool, temperature: float,
                 top_p: float, max_new_tokens: float, seed: float | None, session: Session, request: gr.Request):
        """The /chat endpoint: plain inputs in, the session's chat history (messages) out, streamed."""
        if not session.claim():
            raise gr.Error("A reply is still streaming in this session: wait for it or call /stop.")
        self.sessions.touch(session)
        try:
            try:
                turn = self.speech(make_turn(text, images or [], audio,
                                             make_options(thinking, temperature, top_p, max_new_tokens, seed),
                                             self.settings))
            except InputError as e:
                raise gr.Error(str(e)) from e
            session.start(turn)
            yield session.history()
            with closing(stream_turn(self.engine, session, _session_id(request))) as stream:
                for _ in stream:
                    yield session.history()
        finally:
            if session.turns and session.turns[-1].running:
                session.turns[-1].finish_reason = "cancelled"
            session.release()
        yield session.history()

    def speech(self, turn: Turn, session: Session | None = None) -> Turn:
        """A recording for a model that does not hear: refused plainly when nothing can transcribe it; kept
        out of the request when its transcript is already in the (edited) text, else the engine transcribes."""
        if turn.audio is None or self.caps.hears:
            return turn
        if not self.caps.can_transcribe:
            raise InputError(NO_EARS)
        if session is not None and session.transcribed and turn.text \
                and session.transcribed == fingerprint(turn.audio_path):
            turn.transcribed = True
            session.transcribed = None
        return turn

    def transcribe(self, prompt: dict | None, recording: str | None, session: Session):
        """The recording's transcript into the text box (before what was typed), for editing before Send."""
        prompt = prompt or {}
        path = recording_of(prompt, recording)
        if path is None:
            gr.Warning("Record or attach a recording first, then press Transcribe.")
            return gr.skip()
        try:
            spoken = (self.engine.transcribe(read_audio(path)) or "").strip()
        except InputError as e:
            gr.Warning(str(e))
            return gr.skip()
        except BadRequest as e:
            gr.Warning(as_sentence(str(e)))
            return gr.skip()
        except Exception as e:  # the speech model failed: the user can still type
            log.exception("transcription failed")
            gr.Warning(f"Could not transcribe the recording ({type(e).__name__}): type the question instead.")
            return gr.skip()
        if not spoken:
            gr.Warning("No speech was recognised in the recording: type the question instead.")
            return gr.skip()
        session.transcribed = fingerprint(path)
        typed = (prompt.get("text") or "").strip()
        text = typed if spoken in typed else f"{spoken} {typed}".strip()
        return {"text": text, "files": [file_path(f) for f in prompt.get("files") or []]}

    def stop(self, session: Session) -> None:
        """Stop the running reply: the engine stops within one token."""
        if not session.cancel():
            gr.Info("Nothing is running.")

    def clear(self, session: Session) -> dict:
        """New chat (the New chat button and the chat's trash icon): the conversation goes, the settings stay."""
        p = self.page
        session.clear()
        return {p.chatbot: [], p.prompt: gr.update(value=None), p.mic: None,
                p.turn_pick: self.panels.turn_choices(session), **self.panels.all(session),
                p.model_md: self.model(session), p.export_file: gr.update(value=None, visible=False)}

    def choose_version(self, version: int | None, session: Session) -> dict:
        """Show another version of the shown turn; the conversation (and the next question) follows it."""
        p = self.page
        position = session.shown_position()
        if position is not None and version is not None and not session.busy:
            session.choose(position, int(version))
        elif session.busy:
            gr.Warning("A reply is still streaming: wait for it or press Stop, then switch versions.")
        return {p.chatbot: session.history(), p.turn_pick: self.panels.turn_choices(session),
                **self.panels.all(session), p.model_md: self.model(session)}

    def restore(self, key: str | None, session: Session):
        """On page load: the conversation this browser had (by the key it keeps), or a new one."""
        p = self.page
        known = self.sessions.get(key)
        if known is None:
            session.multi_turn = self.caps.multi_turn
            self.sessions.put(session)
            known = session
        known.sent = {}
        return {self.page.state: known, self.page.browser_key: known.key, p.chatbot: known.history(),
                p.turn_pick: self.panels.turn_choices(known), **self.panels.all(known),
                p.model_md: self.model(known), p.context_mode: CONTEXT_MODES[int(known.multi_turn)]}

    # ------------------------------------------------------------------ examples
    def fill_example(self, index: int) -> tuple:
        """An example into the inputs: (the box's value, the recording)."""
        ex = self.examples[index]
        files = [ex["image"]] if ex.get("image") else []
        return {"text": ex.get("text") or "", "files": files}, ex.get("audio")

    def start_example(self, index: int, session: Session) -> dict:
        """An example starts a new conversation: the chat is cleared and the example goes into the inputs
        (the event's next step sends it). While a reply streams nothing changes."""
        if session.busy:
            gr.Warning("A reply is still streaming: wait for it or press Stop, then pick the example.")
            return {self.page.chatbot: gr.skip()}
        text, recording = self.fill_example(index)
        return {**self.clear(session), self.page.prompt: text, self.page.mic: recording}

    def pick_chat_example(self, session: Session, evt: gr.SelectData) -> dict:
        return self.start_example(evt.index if isinstance(evt.index, int) else 0, session)

    # ------------------------------------------------------------------ panels
    def select_word(self, session: Session, evt: gr.SelectData) -> dict:
        """A click on a word of the reply shows its focus and experts; a second click shows the whole reply."""
        index = evt.index if isinstance(evt.index, int) else None
        turn = session.shown_turn()
        if turn is not None and index is not None and index < len(turn.words()):
            session.view.word = None if session.view.word == index else index
        session.sent = {}  # the next panel tick sends full updates again
        return self.panels.all(session)

    def colour_by_probability(self, on: bool, session: Session) -> dict:
        session.view.probabilities = bool(on)
        session.sent = {}
        return self.panels.all(session)

    def change_view(self, turn_pick: int, image_pick: int | None, audio_pick: int | None, colormap: str,
                    opacity: float, aggregation: str, layer_from: float, layer_to: float, load_view: str,
                    route_layer_from: float, route_layer_to: float, expert_from: float, expert_to: float,
                    session: Session) -> dict:
        view = session.view
        turn = None if turn_pick is None or int(turn_pick) < 0 else int(turn_pick)
        if turn != view.turn:
            view.turn, view.word, view.image, view.audio = turn, None, None, None
        else:
            view.image = None if image_pick is None else int(image_pick)
            view.audio = None if audio_pick is None else int(audio_pick)
        view.colormap, view.opacity, view.aggregation, view.load_view = colormap, float(opacity), aggregation, load_view
        view.layers = (int(layer_from), max(int(layer_to), int(layer_from) + 1))
        if view.known_routing:  # the look-closer ranges, once the sliders know the model's shape
            view.moe_layers = (int(route_layer_from), max(int(route_layer_to), int(route_layer_from) + 1))
            view.experts = (int(expert_from), max(int(expert_to), int(expert_from) + 1))
        session.sent = {}
        return self.panels.all(session)

    def model(self, session: Session) -> str:
        return model_panel(self.caps, session)

    def export(self, session: Session):
        if not session.turns:
            gr.Warning("Nothing to export yet: send a message first.")
            return gr.update(value=None, visible=False)
        if session.busy:
            gr.Warning("A reply is still streaming: the trace holds it as far as it got.")
        path = write_trace_zip(session, self.caps.info, self.export_dir)
        return gr.update(value=str(path), visible=True)
