"""Session state -> the values of the right-hand panels: Focus, Routing, Model, and the turn picker.

``Capabilities`` says what the engine can show (from ``engine.info()``): a remote backend has no
focus or routing, a model may not hear recordings. ``Page`` names the components the handlers
update (``layout.py`` makes them); ``Panels`` turns a ``Session`` into their updates, calling the
pure functions of ``render``. Nothing here reads events or talks to the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from ..memory import peak_rss_bytes, rss_bytes
from . import render
from .session import Session, Turn, View

log = logging.getLogger(__name__)

FOCUS_PLACEHOLDER = ("Caption focus. Send a question with an image (or pick an example on the left): "
                     "the image appears here with a heatmap of where the model looked for each word. "
                     "Click a word of the reply to see its focus; a recording shows its focus over time.")
WORDS_PLACEHOLDER = [("The reply appears here word by word once the model answers.", None)]
ROUTING_PLACEHOLDER = ("Expert routing appears here while the model answers: how many tokens each expert took "
                       "per layer (prefill, decode, by modality), balance figures, and the experts the selected "
                       "word used with their gate weights.")


@dataclass(frozen=True)
class Capabilities:
    """What the engine behind the page can do, read once from ``engine.info()``."""

    info: dict
    focus: bool  # per-token attention maps (not from a remote backend)
    routing: bool  # expert routing
    hears: bool  # the model takes recordings as audio
    can_transcribe: bool  # a speech-to-text model turns recordings into text

    @classmethod
    def of(cls, engine: Any) -> Capabilities:
        info = engine.info()
        return cls(info=info,
                   focus=info.get("focus", True) is not False,  # a local Engine has no "focus" key
                   routing=info.get("routing", True) is not False,
                   hears=info.get("hears_audio", True) is not False,
                   can_transcribe=bool(info.get("can_transcribe")) and callable(getattr(engine, "transcribe", None)))

    @property
    def remote(self) -> bool:
        return render.is_remote(self.info)

    @property
    def transcribing(self) -> bool:
        """Recordings become editable text in the box (a model that does not hear, with speech-to-text)."""
        return not self.hears and self.can_transcribe


def mic_label(caps: Capabilities) -> str:
    if caps.hears:
        return "Spoken question (sent with the turn)"
    if caps.can_transcribe:
        return "Spoken question (transcribed into the text box: edit it, then Send)"
    return "Recording (this model does not hear: type your question)"


def focus_placeholder(caps: Capabilities) -> str:
    if not caps.focus:
        return render.unavailable_html("Caption focus", caps.info.get("reason"))
    return render.placeholder_html(FOCUS_PLACEHOLDER)


def routing_placeholder(caps: Capabilities) -> str:
    if not caps.routing:
        return render.unavailable_html("Expert routing", caps.info.get("reason"))
    return render.placeholder_html(ROUTING_PLACEHOLDER)


def device_memory() -> dict[str, int]:
    """Memory in use now: per GPU (allocated by torch) or, without CUDA, the process RSS."""
    try:
        import torch

        if torch.cuda.is_available():
            return {f"cuda:{d}": int(torch.cuda.memory_allocated(d)) for d in range(torch.cuda.device_count())}
    except Exception:  # no torch or a broken CUDA set-up: fall back to the process
        log.debug("cuda memory query failed", exc_info=True)
    rss = rss_bytes()
    return {"cpu (process RSS)": rss} if rss is not None else {"cpu (peak RSS)": peak_rss_bytes()}


def model_panel(caps: Capabilities, session: Session) -> str:
    """The Model panel: the model, its devices and memory (local engine), the last answer's speed."""
    stats = next((t.stats for t in reversed(session.turns) if t.stats is not None), None)
    return render.model_markdown(caps.info, {} if caps.remote else device_memory(), stats)


def clamp_layers(layers: tuple[int, int] | None, n_layers: int) -> tuple[int, int] | None:
    """The layer sliders' [from, to) range fitted inside a stack of ``n_layers`` maps (at least one layer),
    so any slider value gives a map; None (all layers) stays None."""
    if layers is None or n_layers < 1:
        return layers
    start = min(max(int(layers[0]), 0), n_layers - 1)
    end = min(max(int(layers[1]), start + 1), n_layers)
    return start, end


def hidden() -> dict:
    """A fresh update that hides a component and drops its value (Gradio consumes update dicts)."""
    return gr.update(visible=False, value=None)


@dataclass
class Page:
    """The components the handlers update, by name (made by ``layout.py``)."""

    chatbot: Any
    prompt: Any
    mic: Any
    turn_pick: Any
    focus_caption: Any
    image_pick: Any
    focus_image: Any
    words: Any
    audio_focus: Any
    layer_from: Any
    layer_to: Any
    routing_html: Any
    token_html: Any
    split_html: Any
    model_md: Any
    export_file: Any

    def panel_outputs(self) -> list:
        return [self.focus_caption, self.image_pick, self.focus_image, self.words, self.audio_focus,
                self.layer_from, self.layer_to, self.routing_html, self.token_html, self.split_html]

    def turn_outputs(self) -> list:
        """What sending, regenerating or clearing a turn updates."""
        return [self.chatbot, self.prompt, self.mic, self.turn_pick, *self.panel_outputs(), self.model_md]


@dataclass
class Panels:
    """A session -> updates of the Focus and Routing panels and the turn picker."""

    page: Page
    caps: Capabilities

    def all(self, session: Session) -> dict:
        return {**self.focus(session), **self.routing(session)}

    def turn_choices(self, session: Session) -> dict:
        choices = [("latest", -1)] + [(f"{n + 1}: {(t.text or 'spoken / image question')[:32]}", n)
                                      for n, t in enumerate(session.turns)]
        return gr.update(choices=choices, value=-1 if session.view.turn is None else session.view.turn)

    def focus(self, session: Session) -> dict:
        p, turn, view = self.page, session.shown_turn(), session.view
        if not self.caps.focus:
            return {p.focus_caption: focus_placeholder(self.caps), p.image_pick: gr.update(visible=False),
                    p.focus_image: hidden(), p.words: gr.update(visible=False, value=[]), p.audio_focus: hidden()}
        if turn is None:
            return {p.focus_caption: focus_placeholder(self.caps), p.image_pick: gr.update(visible=False),
                    p.focus_image: hidden(), p.words: WORDS_PLACEHOLDER, p.audio_focus: hidden()}
        words = turn.words()
        indices, label = session.selection(turn)
        n_layers = turn.num_focus_layers()
        layers = clamp_layers(view.layers, n_layers)
        captions: list[str] = []
        out = {p.words: render.word_chips(words, view.word) if words else WORDS_PLACEHOLDER,
               **self._image(turn, view, indices, layers, captions),
               **self._audio(turn, view, indices, layers, captions)}
        out[p.focus_caption] = render.focus_caption_html(
            label, captions, has_media=bool(turn.images or turn.sends_audio), running=turn.running)
        if n_layers and n_layers != view.known_layers:  # first focus of this model: fit the layer sliders
            view.known_layers, view.layers = n_layers, (0, n_layers)
            out[p.layer_from] = gr.update(maximum=max(n_layers - 1, 1), value=0)
            out[p.layer_to] = gr.update(minimum=1, maximum=n_layers, value=n_layers)
        return out

    def _image(self, turn: Turn, view: View, indices: list[int], layers, captions: list[str]) -> dict:
        p = self.page
        if not turn.images:
            return {p.image_pick: gr.update(visible=False), p.focus_image: hidden()}
        k = min(view.image, len(turn.images) - 1)
        heat = turn.focus_map(indices, "image", k, view.aggregation, layers)
        shown = turn.images[k]
        if heat is not None:
            shown = render.overlay_heatmap(shown, heat, view.colormap, view.opacity)
            captions.append(f"{float(np.sum(heat)):.0%} of the attention on image {k + 1}")
        choices = [f"image {n + 1}" for n in range(len(turn.images))]
        return {p.image_pick: gr.update(choices=choices, value=choices[k], visible=len(choices) > 1),
                p.focus_image: gr.update(value=shown, visible=True)}

    def _audio(self, turn: Turn, view: View, indices: list[int], layers, captions: list[str]) -> dict:
        p = self.page
        if not turn.sends_audio:  # none, or transcribed into the text: the model never saw it
            return {p.audio_focus: hidden()}
        heat = turn.focus_map(indices, "audio", 0, view.aggregation, layers)
        if heat is not None:
            captions.append(f"{float(np.sum(heat)):.0%} on the recording")
        figure = render.audio_focus_image(turn.audio.samples, turn.audio.sample_rate, heat, view.colormap,
                                          view.opacity)
        return {p.audio_focus: gr.update(value=figure, visible=True)}

    def routing(self, session: Session) -> dict:
        p, turn = self.page, session.shown_turn()
        if not self.caps.routing or turn is None or not turn.load:
            return {p.routing_html: routing_placeholder(self.caps), p.token_html: "", p.split_html: ""}
        indices, _ = session.selection(turn)
        routed = [i for i in indices if turn.tokens.get(i) and turn.tokens[i].routes]
        token = turn.tokens[routed[-1] if turn.running else routed[0]] if routed else None
        token_label = f"“{token.text.strip()}” (token {token.index})" if token else ""
        routes = token.routes if token else None
        return {p.routing_html: render.routing_heatmap_html(turn.load, session.view.load_view, routes, token_label),
                p.token_html: render.token_routes_html(routes or [], token_label),
                p.split_html: render.modality_split_html(turn.load)}
