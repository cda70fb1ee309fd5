"""The page's own path for a turn: cheap on the server while the reply streams.

Gradio rebuilds a component, its config and its API schema for every ``gr.update`` an event returns,
and fills every output an update leaves out with one (``gr.skip()`` is an update too). Measured with
py-spy on a page turn (issue 16): that, not our rendering, was most of the server's extra CPU per
token against an API turn. So the page splits a turn into events whose outputs are what they change:

  start (Send / Regenerate / edit): validate, submit, first full update, switch the panel timer on
  -> stream: the chat only (one output), redrawn at most every ``CHAT_EVERY_S``
  -> finish: the last full update (panels, Model tab, turn picker), the panel timer off
  timer (every ``PANELS_EVERY_S`` while on): the Focus and Routing panels, as plain values

``plain_values`` sends a component's properties (visibility, choices, label) only when they changed
and its plain value otherwise (the named endpoints' single streaming event, ``Handlers._run``, uses it
too: one request, one stream, for gradio_client users).
"""

from __future__ import annotations

import logging
from contextlib import closing

import gradio as gr

from .inputs import Controls
from .session import Session, Turn, request_session_id as _session_id, stream_turn

log = logging.getLogger(__name__)


def plain_values(session: Session, update: dict) -> dict:
    """``update`` with each ``gr.update`` whose properties equal those sent last turned into its plain value
    (the last value sent when it has none), so Gradio only postprocesses the value; nothing is skipped."""
    out = {}
    for component, value in update.items():
        key = id(component)
        if isinstance(value, dict) and value.get("__type__") == "update":
            props = {k: v for k, v in value.items() if k != "value"}
            last = session.sent.get(("props", key))
            if last is None or not _same(last, props):
                session.sent[("props", key)] = props
                if "value" in value:
                    session.sent[key] = value["value"]
                out[component] = value
                continue
            value = value["value"] if "value" in value else session.sent.get(key)
        session.sent[key] = value
        out[component] = value
    return out


def complete(session: Session, update: dict, outputs: list) -> dict:
    """Every output of a timer event given a value: one left out would be a ``gr.skip()``, which Gradio
    turns into a component rebuild; the value sent last (a slider's number, say) costs nothing."""
    for component in outputs:
        if component not in update and id(component) in session.sent:
            update[component] = session.sent[id(component)]
    return update


def _same(a: dict, b: dict) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # a value that does not compare plainly (an array): send it again
        return False


class LiveTurns:
    """The page's Send / Regenerate / edit as start -> stream -> finish, and the panel timer (mixed into
    ``Handlers``, which provides ``_new_turn``, ``_typed``, ``_again``, ``_edited``, ``_start``, ``_refused``,
    ``panels``, ``page``, ``model``)."""

    def send_page(self, prompt: dict | None, recording: str | None, thinking: bool, temperature: float,
                  top_p: float, max_new_tokens: float, seed: float | None, top_k: float = 0,
                  repetition_penalty: float = 1.0, stop: str | None = None, system: str | None = None,
                  context_mode: str | None = None, typed: str | None = None, session: Session = None,
                  request: gr.Request = None) -> dict:
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)
        turn = self._new_turn(session, controls, self._typed(prompt, recording, session))
        if turn is None:
            return self._refused(controls)
        return self._begin(session, turn, len(session.turns), request, True, controls)

    def regenerate_page(self, thinking: bool, temperature: float, top_p: float, max_new_tokens: float,
                        seed: float | None, top_k: float = 0, repetition_penalty: float = 1.0,
                        stop: str | None = None, system: str | None = None, context_mode: str | None = None,
                        typed: str | None = None, session: Session = None, request: gr.Request = None) -> dict:
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)
        turn = self._new_turn(session, controls, self._again(session))
        if turn is None:
            return self._refused(controls)
        return self._begin(session, turn, len(session.turns) - 1, request, False, controls)

    def edit_page(self, thinking: bool, temperature: float, top_p: float, max_new_tokens: float,
                  seed: float | None, top_k: float = 0, repetition_penalty: float = 1.0, stop: str | None = None,
                  system: str | None = None, context_mode: str | None = None, typed: str | None = None,
                  session: Session = None, request: gr.Request = None, evt: gr.EditData = None) -> dict:
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)
        position, make = self._edited(session, evt)
        turn = self._new_turn(session, controls, make)
        if turn is None:
            return {**self._refused(controls), self.page.chatbot: session.history()}
        return self._begin(session, turn, position, request, False, controls)

    def branch_page(self, alternative: int | None, thinking: bool, temperature: float, top_p: float,
                    max_new_tokens: float, seed: float | None, top_k: float = 0, repetition_penalty: float = 1.0,
                    stop: str | None = None, system: str | None = None, context_mode: str | None = None,
                    typed: str | None = None, session: Session = None, request: gr.Request = None) -> dict:
        """Continue the shown reply from the picked alternative of the clicked word: a new version of that turn
        (the original stays, in the Versions picker), with the current settings for the new tokens."""
        controls = Controls(thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop,
                            system, context_mode, typed)
        position, make = self._branched(session, alternative)
        turn = self._new_turn(session, controls, make)
        if turn is None:
            return self._refused(controls)
        return self._begin(session, turn, position, request, False, controls)

    def _begin(self, session: Session, turn: Turn, position: int, request, clear_inputs: bool,
               controls: Controls) -> dict:
        """``Handlers._start``, and the handle left for this event's own stream step to follow."""
        first, session.pending = self._start(session, turn, position, request, clear_inputs, controls)
        return first

    def stream_chat(self, session: Session, request: gr.Request = None):
        """The chat while the reply streams (the event's only output); the panels follow on the timer."""
        turns = session.turns
        handle, session.pending = session.pending, None  # only the start event's own chain follows it
        if handle is None or not turns or not turns[-1].running:
            return
        turn: Turn = turns[-1]
        try:
            with closing(stream_turn(self.engine, session, _session_id(request), handle=handle)) as stream:
                try:
                    for _ in stream:
                        yield session.history()
                except Exception as e:  # a bug in the page: say so plainly, keep the page usable
                    log.exception("streaming a turn failed")
                    turn.fail(f"The page failed to show this reply ({type(e).__name__}); try again.")
        finally:
            if turn.running:  # the page went away before the turn ended
                turn.finish_reason = "cancelled"
        yield session.history()

    def finish(self, session: Session) -> dict:
        """After the stream: everything once more as full updates, and the panel timer off."""
        p = self.page
        turns = session.turns
        if turns and turns[-1].error and session.sent.get("warned") is not turns[-1]:
            session.sent["warned"] = turns[-1]
            gr.Warning(turns[-1].error)
        session.sent = {}
        return {p.chatbot: session.history(), p.turn_pick: self.panels.turn_choices(session),
                **self.panels.all(session), p.model_md: self.model(session), **self.timers(session, False)}

    def tick_focus(self, session: Session) -> dict:
        """The Focus panel's timer (on while a reply streams and the Focus tab shows): plain values."""
        update = plain_values(session, {**self.panels.versions(session), **self.panels.focus(session)})
        return complete(session, update, self.page.focus_outputs())

    def tick_routing(self, session: Session) -> dict:
        """The Routing panel's timer (on while a reply streams and the Routing tab shows)."""
        return complete(session, plain_values(session, self.panels.routing(session)), self.page.routing_outputs())

    def timers(self, session: Session, running: bool) -> dict:
        """Only the shown tab's panel redraws while a reply streams: a hidden tab costs the server its
        rendering and the browser its re-rendering (plotly) for nothing; it is drawn when it is picked."""
        tab = session.view.tab
        return {self.page.timer: gr.Timer(active=running and tab == "focus"),
                self.page.routing_timer: gr.Timer(active=running and tab == "routing")}

    def pick_tab(self, session: Session, evt: gr.SelectData = None) -> dict:
        label = str(getattr(evt, "value", "") or "").strip().lower()
        session.view.tab = label if label in ("focus", "routing", "model", "export") else "focus"
        session.sent = {}
        turns = session.turns
        running = bool(turns) and turns[-1].running and session.handle is not None
        return {**self.timers(session, running), **self.panels.all(session)}
