"""One user turn and the model's reply, folded from the engine's events into plain records.

``Turn.apply`` folds each event in (text, per-token focus and routing, stats); the chat bubbles, the
focus selection and the export all read those records, so a finished turn stays explorable without
the engine. ``MediaRef`` names every image and recording the model saw in a turn (its own and, in a
multi-turn chat, the earlier turns'), in the order the engine returns their focus maps: that is what
binds a map to the picture it belongs to.

Turns form a tree (``children`` / ``chosen``): Regenerate, an edited question and a branch (the reply
continued from another of a word's alternatives, ``Turn.branch``) add a sibling, so earlier versions
stay browsable; the session follows the chosen child of each turn.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..events import (
    Answer,
    Audio,
    Done,
    Error,
    Event,
    Focus,
    Logprobs,
    Message,
    Notice,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
    aggregate_layers,
    newest_counted,
    routed_experts_array,
)
from .traces import TraceDetail, as_float32, cast
from .words import Word, merge_words

THINKING_TITLE = "Thinking"

Route = tuple[int, list[int], list[float]]  # (layer, experts, gate weights)


@dataclass(slots=True)  # one per generated token, kept for the whole session: no __dict__ (~240 B each)
class TokenTrace:
    """What one generated token looked at and which experts it went to."""

    index: int
    text: str
    phase: str
    images: list[np.ndarray] = field(default_factory=list)  # (rows, cols) each, the engine's aggregation
    audios: list[np.ndarray] = field(default_factory=list)  # (frames,) each
    # the per-layer detail (float16, or traces.Coarse once coarsened; empty once dropped: traces.TraceBudget)
    per_layer_images: list[np.ndarray] = field(default_factory=list)  # (layers, rows, cols)
    per_layer_audios: list[np.ndarray] = field(default_factory=list)  # (layers, frames)
    routes: list[Route] = field(default_factory=list)
    detail: str = "full"  # "full", "coarse" (8 bits) or "dropped": what the budget left of the per-layer detail
    held: int = 0  # bytes of per-layer detail counted by the budget
    kept: int = 0  # bytes of its shown maps and its record counted by it
    # how sure the model was (events.Logprobs; None when the engine sent none)
    token_id: int = -1
    logprob: float | None = None
    entropy: float | None = None
    top: tuple = ()  # ((token id, text, logprob), ...) most likely first

    @property
    def probability(self) -> float | None:
        return math.exp(self.logprob) if self.logprob is not None else None


@dataclass(frozen=True)
class MediaRef:
    """One image or recording the model saw in a turn, and where it came from."""

    label: str  # "image 1" (this turn's) or "turn 2 · image 1" (an earlier turn's)
    turn: int  # 1-based number of the turn that sent it
    index: int  # its position among that turn's images (0 for the recording)
    own: bool  # sent with this turn
    image: Image.Image | None = None
    audio: Audio | None = None


@dataclass(eq=False)  # compared by identity: a turn is one node of the conversation tree
class Turn:
    """One user turn and the model's reply, as the events built it."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    audio: Audio | None = None
    audio_path: str | None = None
    transcribed: bool = False  # the recording became the text (model does not hear): shown, not sent
    options: Options = field(default_factory=Options)
    system: str = ""  # the system prompt this turn was sent with
    alone: bool = True  # sent without the earlier turns ("each turn alone")
    # a branch: the reply's first token ids, fed with the prompt (the earlier version's up to the chosen word, then
    # the alternative picked there); ``branch_note`` says where it branched
    continue_from: list[int] = field(default_factory=list)
    branch_note: str = ""
    read_only: bool = False  # an imported QA trace's turn: reviewed, never continued (no branch offered)
    # every image / recording in the prompt, oldest first (Session.start sets them; None = this turn's own)
    context_images: list[MediaRef] | None = None
    context_audios: list[MediaRef] | None = None
    reasoning: str = ""
    answer: str = ""
    tokens: dict[int, TokenTrace] = field(default_factory=dict)
    # the newest Routing event: its load (events.expert_load) is built when the page reads it, not per token
    routing: Routing | None = field(default=None, repr=False)  # the newest Routing event
    counted: Routing | None = field(default=None, repr=False)  # the newest that came with counts
    prompt_experts: np.ndarray | None = None  # (prompt tokens, moe layers, top_k) int16, from the prefill
    stats: Stats | None = None
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    finish_reason: str | None = None
    queue_position: int | None = None
    think_started: float | None = None
    think_ended: float | None = None
    children: list[Turn] = field(default_factory=list, repr=False)  # the next turn's versions
    chosen: int = 0  # which child the conversation follows
    detail: TraceDetail = field(default_factory=TraceDetail, repr=False)  # its per-layer focus detail's account

    @property
    def load(self) -> dict | None:
        """The routing load as of the newest Routing event with counts (None before one came)."""
        event = newest_counted(self.routing, self.counted)
        return event.load if event is not None else None

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
            trace.per_layer_images = [cast(m, np.float16) for m in event.per_layer_images]
            trace.per_layer_audios = [cast(m, np.float16) for m in event.per_layer_audios]
            return False
        if isinstance(event, Logprobs):
            trace = self._token(event.index, event.token, event.phase)
            trace.token_id, trace.logprob, trace.entropy = event.token_id, event.logprob, event.entropy
            trace.top = tuple((a.token_id, a.token, a.logprob) for a in event.top)
            return False
        if isinstance(event, Routing):
            trace = self._token(event.index, event.token, event.phase)
            trace.routes = [(r.layer, list(r.experts), list(r.weights)) for r in event.layers]
            self.routing = event
            if event.counts is not None:
                self.counted = event
            if self.prompt_experts is None:
                self.prompt_experts = event.prompt_experts
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

    def routed_experts(self) -> np.ndarray | None:
        """The turn's routed experts in vLLM's layout, [tokens, moe layers, top_k] int16 (``events``)."""
        if not self.load or not self.tokens:
            return None
        routes = [t.routes for t in sorted(self.tokens.values(), key=lambda t: t.index)]
        return routed_experts_array(self.prompt_experts, routes, list(self.load.get("layers", [])),
                                    int(self.load.get("top_k", 0)))

    def again(self, text: str | None = None, options: Options | None = None) -> Turn:
        """A new version of this turn: the same question and media (or an edited text), nothing sent yet."""
        return Turn(text=self.text if text is None else text, images=list(self.images),
                    image_paths=list(self.image_paths), audio=self.audio, audio_path=self.audio_path,
                    transcribed=self.transcribed, options=options or self.options)

    def branch(self, index: int, alternative: int, options: Options | None = None) -> Turn:
        """A new version of this turn whose reply keeps this one's tokens before generated token ``index``, takes
        the ``alternative``-th most likely token there instead of the one chosen, and continues from it.

        The kept tokens' records (focus, routing, logprobs) are this turn's: the same forwards made them; so is
        the chosen token's (its focus and routes belong to the forward that chose between the alternatives), with
        its text and logprob the alternative's. The per-layer arrays are shared, not copied (no second copy in
        memory; the page's trace budget counts them once, under this turn)."""
        why = self.unbranchable(index)
        if why:
            raise ValueError(why)
        at = self.tokens[index]
        if not 0 <= alternative < len(at.top):
            raise ValueError("that alternative is not among the word's alternatives")
        before = [self.tokens[i] for i in range(index)]
        alt_id, alt_text, alt_logprob = at.top[alternative]
        turn = self.again(options=options)
        turn.system, turn.alone = self.system, self.alone
        turn.continue_from = [t.token_id for t in before] + [int(alt_id)]
        for t in before:
            turn.tokens[t.index] = _shared(t)
        first = turn.tokens[index] = _shared(at)
        first.text, first.token_id, first.logprob = alt_text, int(alt_id), float(alt_logprob)
        turn.branch_note = (f"branched at token {index + 1}: “{at.text.strip() or at.text}” → "
                            f"“{alt_text.strip() or alt_text}”")
        return turn

    def unbranchable(self, index: int) -> str:
        """Why the reply cannot be continued from another alternative at generated token ``index`` ("" when it
        can): every token up to it must be known with its id (a remote backend's logprobs carry none)."""
        ordered = sorted(self.tokens)
        if index not in self.tokens or ordered != list(range(len(ordered))):
            return "this reply's tokens are not all known: pick a word of a finished reply"
        if any(self.tokens[i].token_id < 0 for i in range(index + 1)):
            return "this reply has no token ids (its backend sent none): it cannot be branched"
        return ""

    # ------------------------------------------------------------------ reading

    @property
    def has_logprobs(self) -> bool:
        return any(t.logprob is not None for t in self.tokens.values())
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
        if self.detail.layers:
            return self.detail.layers
        for t in self.tokens.values():
            for m in t.per_layer_images + t.per_layer_audios:
                return int(m.shape[0])
        return 0

    def media(self, kind: str) -> list[MediaRef]:
        """The images ("image") or recordings ("audio") in this turn's prompt, oldest first."""
        known = self.context_images if kind == "image" else self.context_audios
        if known is not None:
            return known
        if kind == "image":
            return [MediaRef(f"image {k + 1}", 0, k, True, image=im) for k, im in enumerate(self.images)]
        return [MediaRef("recording", 0, 0, True, audio=self.audio)] if self.sends_audio else []

    def focus_map(self, indices: list[int], kind: str, i: int, rule: str = "default",
                  layers: tuple[int, int] | None = None) -> np.ndarray | None:
        """Mean focus of the given tokens on ``self.media(kind)[i]`` (None when no token has a map for it):
        the engine's own maps for ``rule`` "default", else the per-layer maps aggregated by the contract's
        rule over ``layers`` (which must lie within the stack: the page clamps its slider range first).
        A token whose per-layer detail was dropped to fit the page's memory budget gives its default map
        (``traces.detail_note`` says so); a coarsened one is re-aggregated from its 8-bit detail.

        The engine returns one map per image / recording of the prompt, oldest first; when it dropped
        the oldest turns to fit the context, the maps it sends are those of the newest media, so maps
        are matched to ``media`` from the end."""
        n_media = len(self.media(kind))
        maps = []
        for idx in indices:
            t = self.tokens.get(idx)
            if t is None:
                continue
            aggregated = t.images if kind == "image" else t.audios
            per_layer = t.per_layer_images if kind == "image" else t.per_layer_audios
            j = i - (n_media - len(aggregated)) if n_media else i  # position among the maps sent
            if j < 0:
                continue  # this image was dropped from the prompt (oldest turns cut to fit the context)
            if rule != "default" and j < len(per_layer):
                maps.append(aggregate_layers(as_float32(per_layer[j]), rule, layers))
            elif j < len(aggregated):
                maps.append(aggregated[j])
        return np.mean(maps, axis=0) if maps else None

    def dropped_media(self, kind: str) -> int:
        """How many of the prompt's images / recordings the engine left out to fit the context."""
        for t in self.tokens.values():
            sent = len(t.images if kind == "image" else t.audios)
            return max(0, len(self.media(kind)) - sent)
        return 0

    @property
    def sends_audio(self) -> bool:
        """The recording goes to the model (not when it was transcribed into the text instead)."""
        return self.audio is not None and not self.transcribed

    def user_message(self) -> Message:
        return Message("user", self.text, list(self.images), [self.audio] if self.sends_audio else [])

    def own_media(self, number: int) -> tuple[list[MediaRef], list[MediaRef]]:
        """This turn's own images and recording as references, labelled as the ``number``-th turn's."""
        images = [MediaRef(f"turn {number} · image {k + 1}", number, k, False, image=im)
                  for k, im in enumerate(self.images)]
        audios = [MediaRef(f"turn {number} · recording", number, 0, False, audio=self.audio)] \
            if self.sends_audio else []
        return images, audios

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


def _shared(trace: TokenTrace) -> TokenTrace:
    """A branch's copy of a token record: its own fields, the same map arrays, nothing counted by the budget."""
    twin = copy.copy(trace)
    twin.held = twin.kept = 0
    return twin


def as_sentence(message: str) -> str:
    message = message.strip()
    return message[:1].upper() + message[1:] if message else "Something went wrong"
