"""The page's event handlers: each turns one user action into component updates.

Chat handlers make a ``Turn`` from the inputs (``inputs.py``), let ``session.stream_turn`` fold the
engine's events into the session, and yield the chat plus the panels (``panels.py``) as it streams.
Panel handlers change the session's ``View`` and redraw. Only ``engine.submit`` (through
``stream_turn``) and ``engine.transcribe`` are called: never the model.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import Settings
from ..events import BadRequest
from .export import write_trace_zip
from .inputs import InputError, fingerprint, file_path, make_options, make_turn, read_audio, recording_of
from .panels import Capabilities, Page, Panels, model_panel
from .session import Session, Turn, as_sentence, stream_turn

log = logging.getLogger(__name__)

NO_EARS = ("This model does not hear recordings, and no speech-to-text model is set up: type your question "
           "instead.")


def _session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "ui"


class Handlers:
    """The handlers of one page, bound to its engine, settings and output components."""

    def __init__(self, engine: Any, settings: Settings, caps: Capabilities, page: Page, examples: list[dict]):
        self.engine, self.settings, self.caps, self.page, self.examples = engine, settings, caps, page, examples
        self.panels = Panels(page, caps)
        self.export_dir = Path(tempfile.mkdtemp(prefix="autoglm-export-"))

    # ------------------------------------------------------------------ chat
    def send(self, prompt: dict | None, recording: str | None, thinking: bool, temperature: float, top_p: float,
             max_new_tokens: float, seed: float | None, session: Session, request: gr.Request):
        """Send what is in the inputs as a new turn and stream the reply into the page."""
        prompt = prompt or {}
        turn = self._new_turn(session, lambda: self.speech(make_turn(
            prompt.get("text", ""), prompt.get("files", []), recording,
            make_options(thinking, temperature, top_p, max_new_tokens, seed), self.settings), session))
        if turn is None:
            yield {self.page.chatbot: gr.skip()}
            return
        yield from self._run(session, turn, request, clear_inputs=True)

    def regenerate(self, thinking: bool, temperature: float, top_p: float, max_new_tokens: float,
                   seed: float | None, session: Session, request: gr.Request):
        """Ask again: the last turn's inputs with the current settings replace the last reply."""
        def again() -> Turn:
            if not session.turns:
                raise InputError("Nothing to regenerate yet: send a message first.")
            last = session.turns.pop()
            return Turn(text=last.text, images=last.images, image_paths=last.image_paths, audio=last.audio,
                        audio_path=last.audio_path, transcribed=last.transcribed,
                        options=make_options(thinking, temperature, top_p, max_new_tokens, seed))

        turn = self._new_turn(session, again)
        if turn is None:
            yield {self.page.chatbot: gr.skip()}
            return
        yield from self._run(session, turn, request, clear_inputs=False)

    def _new_turn(self, session: Session, make: Callable[[], Turn]) -> Turn | None:
        """The new turn, or None (with a warning) when the session already has one in flight (a double
        click on Send) or the inputs cannot be used. A returned turn holds the session's claim: ``_run``
        releases it."""
        if not session.claim():
            gr.Warning("A reply is still streaming: wait for it or press Stop.")
            return None
        try:
            return make()
        except InputError as e:
            session.release()
            gr.Warning(str(e))
            return None
        except BaseException:
            session.release()
            raise

    def _run(self, session: Session, turn: Turn, request: gr.Request | None, clear_inputs: bool):
        p = self.page
        try:
            session.start(turn)
            first = {p.chatbot: session.history(), p.turn_pick: self.panels.turn_choices(session),
                     **self.panels.all(session)}
            if clear_inputs:
                first.update({p.prompt: gr.update(value=None), p.mic: None})
            yield first
            with closing(stream_turn(self.engine, session, _session_id(request))) as stream:  # closing cancels
                try:
                    for full in stream:
                        update = {p.chatbot: session.history()}
                        if full:
                            update.update(self.panels.all(session))
                        yield update
                except Exception as e:  # a bug in the page: say so plainly, keep the page usable
                    log.exception("streaming a turn failed")
                    turn.fail(f"The page failed to show this reply ({type(e).__name__}); try again.")
        finally:
            if turn.running:  # the page went away before the turn ended
                turn.finish_reason = "cancelled"
            session.release()
        if turn.error:
            gr.Warning(turn.error)
        yield {p.chatbot: session.history(), **self.panels.all(session), p.model_md: self.model(session)}

    def api_chat(self, text: str, images: list | None, audio: str | None, thinking: bool, temperature: float,
                 top_p: float, max_new_tokens: float, seed: float | None, session: Session, request: gr.Request):
        """The /chat endpoint: plain inputs in, the session's chat history (messages) out, streamed."""
        if not session.claim():
            raise gr.Error("A reply is still streaming in this session: wait for it or call /stop.")
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
        p = self.page
        session.clear()
        return {p.chatbot: [], p.prompt: gr.update(value=None), p.mic: None,
                p.turn_pick: self.panels.turn_choices(session), **self.panels.all(session),
                p.model_md: self.model(session), p.export_file: gr.update(value=None, visible=False)}

    # ------------------------------------------------------------------ examples
    def fill_example(self, index: int) -> tuple:
        """An example into the inputs: (the box's value, the recording)."""
        ex = self.examples[index]
        files = [ex["image"]] if ex.get("image") else []
        return {"text": ex.get("text") or "", "files": files}, ex.get("audio")

    def pick_chat_example(self, evt: gr.SelectData) -> tuple:
        return self.fill_example(evt.index if isinstance(evt.index, int) else 0)

    # ------------------------------------------------------------------ panels
    def select_word(self, session: Session, evt: gr.SelectData) -> dict:
        """A click on a word of the reply shows its focus and experts; a second click shows the whole reply."""
        index = evt.index if isinstance(evt.index, int) else None
        turn = session.shown_turn()
        if turn is not None and index is not None and index < len(turn.words()):
            session.view.word = None if session.view.word == index else index
        return self.panels.all(session)

    def change_view(self, turn_pick: int, image_pick: str | None, colormap: str, opacity: float, aggregation: str,
                    layer_from: float, layer_to: float, load_view: str, session: Session) -> dict:
        view = session.view
        turn = None if turn_pick is None or int(turn_pick) < 0 else int(turn_pick)
        if turn != view.turn:
            view.turn, view.word, view.image = turn, None, 0
        elif image_pick:
            view.image = max(0, int(str(image_pick).split()[-1]) - 1)
        view.colormap, view.opacity, view.aggregation, view.load_view = colormap, float(opacity), aggregation, load_view
        view.layers = (int(layer_from), max(int(layer_to), int(layer_from) + 1))
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
