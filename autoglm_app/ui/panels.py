"""Session state -> the values of the right-hand panels: Focus, Routing, Model, and the turn picker.

``Capabilities`` says what the engine can show (from ``engine.info()``): a remote backend has no
focus or routing, a model may not hear recordings. ``Page`` names the components the handlers
update (``layout.py`` makes them); ``Panels`` turns a ``Session`` into their updates, calling the
pure functions of ``render``. Nothing here reads events or talks to the engine.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np

from ..memory import device_memory
from . import figures, render
from .model_view import is_remote, model_markdown
from .session import Session, Turn, View
from .traces import detail_note
from .turn import MediaRef
from .words import THINK_TAGS


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
    multi_turn: bool = True  # what the model was trained for (its card); the page's default context mode
    domain: str = ""  # what the model knows, in its card's words ("" = the card does not say)
    # memory in use now, read where the model is (``Engine.memory``: the engine process's, when it has its own);
    # None: this process's
    memory: Callable[[], dict] | None = None

    @classmethod
    def of(cls, engine: Any) -> Capabilities:
        info = engine.info()
        return cls(info=info,
                   focus=info.get("focus", True) is not False,  # a local Engine has no "focus" key
                   routing=info.get("routing", True) is not False,
                   hears=info.get("hears_audio", True) is not False,
                   can_transcribe=bool(info.get("can_transcribe")) and callable(getattr(engine, "transcribe", None)),
                   multi_turn=info.get("conversation") != "single-turn", domain=info.get("domain") or "",
                   memory=getattr(engine, "memory", None))

    @property
    def remote(self) -> bool:
        return is_remote(self.info)

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


def model_panel(caps: Capabilities, session: Session) -> str:
    """The Model panel: the model, its devices and memory (local engine), the last answer's speed."""
    stats = next((t.stats for t in reversed(session.turns) if t.stats is not None), None)
    return model_markdown(caps.info, {} if caps.remote else (caps.memory or device_memory)(), stats)


def emitted_rank(t) -> int:
    """Where the emitted token stands among a token's alternatives (-1: not among them): by id, or by text where
    the backend sent no ids."""
    if t.token_id >= 0:
        return next((r for r, (tid, _, _) in enumerate(t.top) if tid == t.token_id), -1)
    return next((r for r, (_, text, _) in enumerate(t.top) if text == t.text), -1)


def word_probabilities(turn: Turn, words: list) -> list[float | None]:
    """Each word's probability for the colours: that of its least likely token (None where none has a logprob)."""
    out = []
    for w in words:
        ps = [turn.tokens[i].probability for i in w.tokens if i in turn.tokens]
        ps = [p for p in ps if p is not None]
        out.append(min(ps) if ps else None)
    return out


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
    version_pick: Any
    focus_caption: Any
    image_pick: Any
    focus_image: Any
    words: Any
    audio_pick: Any
    audio_focus: Any
    layer_from: Any
    layer_to: Any
    routing_html: Any
    routing_plot: Any
    balance_plot: Any
    token_html: Any
    split_html: Any  # the modality split (a plot)
    model_md: Any
    export_file: Any
    settings: list = field(default_factory=list)  # the generation-settings sliders, in inputs.SLIDERS order
    state: Any = None
    browser_key: Any = None
    context_mode: Any = None
    timer: Any = None  # the Focus panel's timer while a reply streams
    routing_timer: Any = None  # the Routing panel's
    route_sliders: tuple | None = None  # layer from / to, expert from / to of the routing figure
    alternatives: tuple | None = None  # the probability legend, the alternatives table, their picker, the branch button

    def __post_init__(self):
        self.extra = list(self.route_sliders or ())
        self.alts = list(self.alternatives or ())

    def focus_outputs(self) -> list:
        return [self.version_pick, self.focus_caption, self.image_pick, self.focus_image, self.words,
                self.audio_pick, self.audio_focus, self.layer_from, self.layer_to, *self.alts]

    def routing_outputs(self) -> list:
        return [self.routing_html, self.routing_plot, self.balance_plot, self.token_html, self.split_html,
                *self.extra]

    def panel_outputs(self) -> list:
        return [self.version_pick, self.focus_caption, self.image_pick, self.focus_image, self.words,
                self.audio_pick, self.audio_focus, self.layer_from, self.layer_to, self.routing_html,
                self.routing_plot, self.balance_plot, self.token_html, self.split_html, *self.extra, *self.alts]

    def turn_outputs(self) -> list:
        """What sending, regenerating or clearing a turn updates."""
        return [self.chatbot, self.prompt, self.mic, self.turn_pick, *self.panel_outputs(), self.model_md,
                *self.settings]


def window_html(load: dict) -> str:
    """The serving engines' routing figures (issue 20), mean over the MoE layers: balancedness (mean / max
    load, SGLang's) over the last 10 / 100 / 1,000 routed tokens, the share of dead experts over the
    same windows, exp(H)/N diversity, and the generated tokens by phase."""
    windows = load.get("balancedness") or {}
    if not windows:
        return ""
    dead, tokens = load.get("dead_fraction") or {}, load.get("window_tokens") or {}
    parts = []
    for w in ("10", "100", "1000"):
        if w in windows and np.size(windows[w]):
            n = tokens.get(w, "?")
            parts.append(f"last {w} ({n} tokens): balancedness {float(np.mean(windows[w])):.2f}, "
                         f"dead experts {float(np.mean(dead.get(w, [0]))):.0%}")
    diversity = load.get("diversity")
    if diversity is not None and np.size(diversity):
        parts.append(f"diversity exp(H)/N {float(np.mean(diversity)):.2f}")
    phases = load.get("phase_tokens") or {}
    if phases:
        parts.append(f"generated: {phases.get('reasoning', 0)} reasoning, {phases.get('answer', 0)} answer tokens")
    return f'<div class="caption">{" · ".join(html.escape(x) for x in parts)}</div>'


def _default_media(turn: Turn, kind: str) -> int:
    """The map shown first: the turn's own first image / recording, else the newest one in its prompt."""
    media = turn.media(kind)
    return next((i for i, m in enumerate(media) if m.own), len(media) - 1)


def _pick(turn: Turn, kind: str, chosen: int | None) -> int:
    media = turn.media(kind)
    return chosen if chosen is not None and 0 <= chosen < len(media) else _default_media(turn, kind)


def _where(ref: MediaRef) -> str:
    return ref.label if ref.own else f"{ref.label} (an earlier turn's)"


@dataclass
class Panels:
    """A session -> updates of the Focus and Routing panels and the turn picker."""

    page: Page
    caps: Capabilities

    def all(self, session: Session) -> dict:
        return {**self.versions(session), **self.focus(session), **self.routing(session)}

    def turn_choices(self, session: Session) -> dict:
        choices = [("latest", -1)] + [(f"{n + 1}: {(t.text or 'spoken / image question')[:32]}", n)
                                      for n, t in enumerate(session.turns)]
        return gr.update(choices=choices, value=-1 if session.view.turn is None else session.view.turn)

    def versions(self, session: Session) -> dict:
        """The shown turn's versions (Regenerate and edits add one): a picker when there is more than one."""
        position = session.shown_position()
        if position is None:
            return {self.page.version_pick: gr.update(choices=[], value=None, visible=False)}
        chosen, n = session.versions(position)
        siblings = session._parent(position).children
        choices = [(f"version {v + 1} of {n}" + (f" · {siblings[v].branch_note}" if siblings[v].branch_note else ""), v)
                   for v in range(n)]
        return {self.page.version_pick: gr.update(choices=choices, value=chosen, visible=n > 1,
                                                  label=f"Versions of turn {position + 1}")}

    def focus(self, session: Session) -> dict:
        p, turn, view = self.page, session.shown_turn(), session.view
        if not self.caps.focus:  # (a remote backend) no maps; the reply's words still, when logprobs came with it
            out = {p.focus_caption: focus_placeholder(self.caps), p.image_pick: gr.update(visible=False),
                   p.focus_image: hidden(), p.words: gr.update(visible=False, value=[]),
                   p.audio_pick: gr.update(visible=False), p.audio_focus: hidden()}
            words = turn.words() if turn is not None else []
            if words and turn.has_logprobs:
                probabilities = word_probabilities(turn, words) if view.probabilities else None
                out[p.words] = gr.update(visible=True, value=render.word_chips(words, view.word, probabilities))
                out.update(self.alternatives(session, turn, words))
            return out
        if turn is None:
            return {p.focus_caption: focus_placeholder(self.caps), p.image_pick: gr.update(visible=False),
                    p.focus_image: hidden(), p.words: WORDS_PLACEHOLDER, p.audio_pick: gr.update(visible=False),
                    p.audio_focus: hidden()}
        words = turn.words()
        indices, label = session.selection(turn)
        n_layers = turn.num_focus_layers()
        layers = clamp_layers(view.layers, n_layers)
        captions: list[str] = []
        probabilities = word_probabilities(turn, words) if view.probabilities else None
        out = {p.words: render.word_chips(words, view.word, probabilities) if words else WORDS_PLACEHOLDER,
               **self.alternatives(session, turn, words),
               **self._image(turn, view, indices, layers, captions),
               **self._audio(turn, view, indices, layers, captions)}
        for kind, what in (("image", "image"), ("audio", "recording")):
            dropped = turn.dropped_media(kind)
            if dropped:
                captions.append(f"{dropped} earlier {what}{'s' if dropped > 1 else ''} left out to fit the context")
        # a per-layer view (mean / max over a layer range) of tokens whose detail gave way to the memory budget
        note, fell_back = detail_note(turn, indices) if view.aggregation != "default" else ("", False)
        if note:
            captions.append(note)
        has_media = bool(turn.media("image") or turn.media("audio"))
        out[p.focus_caption] = render.focus_caption_html(label, captions, has_media=has_media, running=turn.running,
                                                         aggregation="default" if fell_back else view.aggregation)
        if not has_media and not turn.alone:
            out[p.focus_caption] = render.placeholder_html(
                "No image or recording in this conversation yet, so there is no focus to show. Click a word of "
                "the reply to see its experts in the Routing tab.")
        elif not has_media:
            out[p.focus_caption] = render.placeholder_html(
                "This turn has no image or recording and was sent alone (each turn alone), so there is no focus "
                "to show. Switch to multi-turn in Generation settings to ask about earlier images; click a "
                "word to see its experts in the Routing tab.")
        if n_layers and n_layers != view.known_layers:  # first focus of this model: fit the layer sliders
            view.known_layers, view.layers = n_layers, (0, n_layers)
            out[p.layer_from] = gr.update(maximum=max(n_layers - 1, 1), value=0)
            out[p.layer_to] = gr.update(minimum=1, maximum=max(n_layers, 2), value=n_layers)  # min < max
        return out

    def alternatives(self, session: Session, turn: Turn | None, words: list) -> dict:
        """The probability legend (colours on), and for a clicked word of a finished reply its tokens'
        alternatives, with the picker and the button that continue the reply from one of them."""
        if not self.page.alts:
            return {}
        legend, table, pick, button = self.page.alts
        view = session.view
        out = {legend: render.probability_legend_html() if view.probabilities and turn is not None
               and turn.has_logprobs else ""}
        word = words[view.word] if turn is not None and view.word is not None and view.word < len(words) else None
        traces = [turn.tokens[i] for i in word.tokens if i in turn.tokens] if word is not None else []
        traces = [t for t in traces if t.logprob is not None]
        if not traces:
            return {**out, table: "", pick: gr.update(choices=[], value=None, visible=False),
                    button: gr.update(visible=False)}
        rows = [{"text": t.text, "p": t.probability, "entropy": t.entropy,
                 "top": [(text, float(np.exp(lp))) for _, text, lp in t.top],
                 "emitted": emitted_rank(t)}
                for t in traces]
        first = traces[0]
        skip = emitted_rank(first)
        choices = [(f"“{text}” {render.percent(float(np.exp(lp)))}", r) for r, (_, text, lp) in enumerate(first.top)
                   if r != skip]
        # a branch feeds token ids: a reply without them (a remote backend's) shows its alternatives, offers none
        can_branch = bool(choices) and not turn.running and not turn.read_only and not turn.unbranchable(first.index)
        return {**out, table: render.alternatives_html(rows, word.text.strip()),
                pick: gr.update(choices=choices, value=None, visible=can_branch,
                                label=f"Continue from an alternative to “{first.text.strip() or first.text}” "
                                      f"(token {first.index + 1})"),
                button: gr.update(visible=can_branch)}

    @staticmethod
    def _share(turn: Turn, heat, indices: list[int], kind: str, k: int, view: View, layers, where: str) -> list[str]:
        """The caption's share of the attention on one image / recording, from a map that is a distribution:
        the drawn map itself, or, when max over layers is drawn (whose sum is no share), the layer mean."""
        share_map = turn.focus_map(indices, kind, k, "mean", layers) if view.aggregation == "max" else heat
        return [render.focus_share_caption(share_map, where)] if share_map is not None else []

    def _image(self, turn: Turn, view: View, indices: list[int], layers, captions: list[str]) -> dict:
        p = self.page
        media = turn.media("image")
        if not media:
            return {p.image_pick: gr.update(visible=False), p.focus_image: hidden()}
        k = _pick(turn, "image", view.image)
        heat = turn.focus_map(indices, "image", k, view.aggregation, layers)
        shown = media[k].image
        if heat is not None:
            shown = render.overlay_heatmap(shown, heat, view.colormap, view.opacity)
            captions += self._share(turn, heat, indices, "image", k, view, layers, _where(media[k]))
        elif turn.tokens:
            captions.append(f"{_where(media[k])} was left out of the prompt to fit the context: no focus on it")
        choices = [(m.label, n) for n, m in enumerate(media)]
        return {p.image_pick: gr.update(choices=choices, value=k, visible=len(choices) > 1),
                p.focus_image: gr.update(value=shown, visible=True, label=f"Focus heatmap: {media[k].label}")}

    def _audio(self, turn: Turn, view: View, indices: list[int], layers, captions: list[str]) -> dict:
        p = self.page
        media = turn.media("audio")
        if not media:  # none, or transcribed into the text: the model never heard it
            return {p.audio_pick: gr.update(visible=False), p.audio_focus: hidden()}
        k = _pick(turn, "audio", view.audio)
        heat = turn.focus_map(indices, "audio", k, view.aggregation, layers)
        if heat is not None:
            captions += self._share(turn, heat, indices, "audio", k, view, layers, _where(media[k]))
        audio = media[k].audio
        figure = render.audio_focus_image(audio.samples, audio.sample_rate, heat, view.colormap, view.opacity)
        choices = [(m.label, n) for n, m in enumerate(media)]
        return {p.audio_pick: gr.update(choices=choices, value=k, visible=len(choices) > 1),
                p.audio_focus: gr.update(value=figure, visible=True, label=f"Focus over {media[k].label}")}

    def routing(self, session: Session) -> dict:
        """The Routing tab: the layers x experts heatmap (the selected token's experts marked), the balance
        figures of the selected view, the token's experts with gate weights, and the modality split."""
        p, turn, view = self.page, session.shown_turn(), session.view
        if not self.caps.routing or turn is None or not turn.load:
            return {p.routing_html: routing_placeholder(self.caps), p.routing_plot: gr.update(visible=False),
                    p.balance_plot: gr.update(visible=False), p.token_html: "",
                    p.split_html: gr.update(visible=False)}
        load = turn.load
        token = self.routed_token(session, turn)
        token_label = f"“{token.text.strip()}” (token {token.index})" if token else ""
        routes = token.routes if token else None
        out = self._fit_routing_sliders(view, load)
        empty = figures.empty_view_message(load, view.load_view)
        heat = figures.routing_figure(load, view.load_view, routes, token_label, view.moe_layers, view.experts)
        balance = figures.balance_figure(load, view.load_view, view.moe_layers)
        split = figures.modality_figure(load, view.experts)
        out.update({p.routing_html: empty or figures.balance_html(load, view.load_view) + window_html(load),
                    p.routing_plot: gr.update(value=heat, visible=heat is not None),
                    p.balance_plot: gr.update(value=balance, visible=balance is not None),
                    p.token_html: render.token_routes_html(routes or [], token_label),
                    p.split_html: gr.update(value=split, visible=split is not None)})
        return out

    def _fit_routing_sliders(self, view: View, load: dict) -> dict:
        """The look-closer sliders' ranges set to this model's MoE layers and experts (once per shape)."""
        p = self.page
        shape = (len(load.get("layers", [])), int(load.get("experts", 0)))
        if p.route_sliders is None or shape == getattr(view, "known_routing", None) or not all(shape):
            return {}
        view.known_routing, view.moe_layers, view.experts = shape, None, None
        layer_from, layer_to, expert_from, expert_to = p.route_sliders
        return {layer_from: gr.update(maximum=max(shape[0] - 1, 1), value=0),
                layer_to: gr.update(minimum=1, maximum=max(shape[0], 2), value=shape[0]),
                expert_from: gr.update(maximum=max(shape[1] - 1, 1), value=0),
                expert_to: gr.update(minimum=1, maximum=max(shape[1], 2), value=shape[1])}

    @staticmethod
    def routed_token(session: Session, turn: Turn):
        """The token whose experts the Routing tab marks: the clicked word's first, the newest while
        streaming, else the answer's first word (never a think tag or a blank token)."""
        indices, _ = session.selection(turn)
        routed = [turn.tokens[i] for i in indices if turn.tokens.get(i) and turn.tokens[i].routes]
        if not routed:
            return None
        if turn.running and session.view.word is None:
            return routed[-1]
        words = [t for t in routed if t.text.strip() and t.text.strip() not in THINK_TAGS]
        return (words or routed)[0]
