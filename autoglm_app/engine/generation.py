"""The generation loop, in the gpt-fast shape: ``prefill`` the prompt, then ``decode_step`` one token at a time.

Each forward ends in the one place a token is picked (``Sampler.pick``); ``TokenEmitter`` turns each
kept token into Reasoning / Answer deltas and the Focus and Routing records the probes left on that
forward; ``timing_stats`` turns the request's timeline into Stats. The probes plug in with ``with``
and do not change the loop's shape.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache

from ..events import (
    Answer,
    BadRequest,
    ChatRequest,
    Event,
    Focus,
    LayerRoute,
    Message,
    Notice,
    Options,
    Reasoning,
    Routing,
    Stats,
    aggregate_layers,
    expert_load,
    routing_summary,
)
from ..families.base import ModelFamily, Prepared
from .probes import FocusProbe, RoutingProbe
from .runtime import Runtime
from .sampling import IncrementalDecoder, Sampler
from .stats import Timeline, peak_memory, reset_peak_memory, timing_stats
from .thinksplit import ThinkSplitter

# ----------------------------------------------------------------------------- context


def prompt_tokens(prep: Prepared) -> int:
    return int(prep.inputs["input_ids"].shape[1])


def fit_context(family: ModelFamily, processor, messages: list[Message], opts: Options,
                limit: int) -> tuple[Prepared, int]:
    """The prompt, prepared once, after dropping the oldest turns until prompt + max_new_tokens fits;
    never the current turn. Returns (prepared prompt, turns dropped).

    The usual prompt fits as sent, so it is prepared once and measured by its own ids; only when
    turns have to go are the shorter candidates counted (``family.count_tokens``) and the one that
    fits prepared again. A current turn that alone is too long is the client's to fix: BadRequest.
    """
    budget = limit - opts.max_new_tokens
    system = [m for m in messages if m.role == "system"][:1]
    turns = [m for m in messages if m.role != "system"]
    prep = family.prepare(processor, system + turns, opts.enable_thinking)
    n, dropped = prompt_tokens(prep), 0
    while n > budget:
        # the oldest user turn and everything up to the next user turn go together
        nxt = next((i for i in range(1, len(turns)) if turns[i].role == "user"), None)
        if nxt is None:
            raise BadRequest(
                f"this turn needs {n} prompt tokens plus {opts.max_new_tokens} new tokens, over the "
                f"{limit}-token context: shorten the text, send fewer images or a shorter recording, "
                "or lower max_new_tokens"
            )
        turns = turns[nxt:]
        dropped += 1
        n = family.count_tokens(processor, system + turns, opts.enable_thinking)
    if dropped:
        prep = family.prepare(processor, system + turns, opts.enable_thinking)
    return prep, dropped


# ----------------------------------------------------------------------------- one token


def prefill(rt: Runtime, inputs: dict, cache: DynamicCache, memory_state, sampler: Sampler) -> tuple[int, object]:
    """The whole prompt in one forward (filling ``cache``) -> the first token, and the model's memory after it."""
    rt.family.begin(rt.model)
    out = rt.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1,
                   **rt.family.forward_kwargs(memory_state))
    return sampler.pick(out.logits[0, -1]), getattr(out, "memory_state", None)


def decode_step(rt: Runtime, token: int, cache: DynamicCache, memory_state,
                sampler: Sampler) -> tuple[int, object]:
    """One token: forward it with the cache -> logits of the next position -> the next token, and the memory."""
    out = rt.model(input_ids=torch.tensor([[token]], device=rt.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1, **rt.family.forward_kwargs(memory_state))
    return sampler.pick(out.logits[0, -1]), getattr(out, "memory_state", None)


# ----------------------------------------------------------------------------- emit


class TokenEmitter:
    """Each kept token -> its text as Reasoning / Answer deltas, then the Focus and Routing records of the
    forward that chose it. ``answer`` is the answer text so far (stop strings are looked for in it)."""

    def __init__(self, emit: Callable[[Event], None], decoder: IncrementalDecoder, splitter: ThinkSplitter,
                 timeline: Timeline, focus: FocusProbe | None, routing: RoutingProbe | None,
                 focus_rule: tuple[str, tuple[int, int] | None]):
        self.emit, self.decoder, self.splitter, self.timeline = emit, decoder, splitter, timeline
        self.focus, self.routing = focus, routing
        self.rule, self.layers = focus_rule
        self.answer = ""
        self.phase = splitter.phase  # of the newest token (the RoutingProbe's by_phase split)

    def token(self, index: int, token: int, now: float) -> None:
        delta = self.decoder.push(token)
        pieces = self.splitter.feed(delta)
        phase = pieces[-1][0] if pieces else self.splitter.phase
        self.phase = phase
        self.timeline.piece(phase, now)
        self.pieces(pieces)
        if self.focus is not None:
            self._focus(index, delta, phase)
        if self.routing is not None:
            route = self.routing.collect()
            self.emit(Routing(index, delta, phase, [LayerRoute(*r) for r in route], self.routing.counts()))

    def pieces(self, pieces: list[tuple[str, str]]) -> None:
        for phase, text in pieces:
            if phase == "reasoning":
                self.emit(Reasoning(text))
            else:
                self.emit(Answer(text))
                self.answer += text

    def finish(self) -> None:
        """The text the splitter still held back (a possible tag that never completed)."""
        self.pieces(self.splitter.finish())

    def _focus(self, index: int, token: str, phase: str) -> None:
        per_layer = self.focus.take()
        if per_layer.size == 0:
            return
        images, audios = self.focus.split(per_layer)
        self.emit(Focus(
            index=index, token=token, phase=phase,
            images=[aggregate_layers(m, self.rule, self.layers) for m in images],
            audios=[aggregate_layers(m, self.rule, self.layers) for m in audios],
            per_layer_images=images, per_layer_audios=audios,
        ))


# ----------------------------------------------------------------------------- one request


class Generation:
    """One request on the loaded model: ``run()`` emits its events and returns its Stats; ``memory_state``
    is then the model's recurrent memory after it (AutoGLM), for the session's next turn."""

    def __init__(self, rt: Runtime, request: ChatRequest, emit: Callable[[Event], None],
                 cancelled: Callable[[], bool], memory_state=None):
        self.rt, self.req, self.emit, self.cancelled = rt, request, emit, cancelled
        self.memory_state = memory_state
        self.cache_tokens = 0  # tokens in this request's KV cache now (the prompt, then one per decode step)

    @torch.inference_mode()
    def run(self) -> Stats:
        rt, opts = self.rt, self.req.options
        timeline = Timeline(time.perf_counter())
        prep, dropped = fit_context(rt.family, rt.processor, self.req.messages, opts, rt.context_limit)
        if dropped:
            self.emit(Notice(f"the conversation was too long for the {rt.context_limit}-token context: "
                             f"the oldest {dropped} turn(s) were left out of this answer"))
        inputs = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
        focus_rule = rt.focus_rule(opts)
        sampler = Sampler(opts, inputs["input_ids"][0], rt.banned_ids, rt.stop_list)
        focus = (FocusProbe(rt.attention_modules, prep.image_spans, prep.audio_spans)
                 if opts.focus and (prep.image_spans or prep.audio_spans) else None)
        routing = RoutingProbe(rt.routers, rt.num_experts, rt.top_k, rt.family.read_route) \
            if opts.routing and rt.routers else None
        if routing is not None:
            routing.modality = torch.from_numpy(prep.modality)
        reset_peak_memory()
        with contextlib.ExitStack() as probes:
            for probe in (focus, routing):
                if probe is not None:
                    probes.enter_context(probe)
            emitter = TokenEmitter(self.emit, IncrementalDecoder(rt.processor.tokenizer),
                                   ThinkSplitter(opts.enable_thinking, rt.family.think_open, rt.family.think_close,
                                                 rt.family.answer_tags, opened=prep.thinking_open),
                                   timeline, focus, routing, focus_rule)
            finish = self._decode(inputs, sampler, emitter, routing)
            emitter.finish()
        stats = timing_stats(
            timeline, time.perf_counter(), reasoning_tokens=timeline.reasoning, answer_tokens=timeline.answer,
            completion_tokens=sampler.kept, prompt_tokens=prompt_tokens(prep), finish_reason=finish,
            attention=focus.mode if focus is not None else "sdpa", peak_memory=peak_memory(),
        )
        if routing is not None and routing.tokens["prefill"]:  # what the turn's last Routing event said
            stats.routing = routing_summary(expert_load(routing.counts()))
        return stats

    def _decode(self, inputs: dict, sampler: Sampler, emitter: TokenEmitter, routing: RoutingProbe | None) -> str:
        """Prefill, then decode until a stop id, a stop string, max_new_tokens or a cancel: the finish reason."""
        rt, opts = self.rt, self.req.options
        cache = DynamicCache()
        token, self.memory_state = prefill(rt, inputs, cache, self.memory_state, sampler)
        self.cache_tokens = int(inputs["input_ids"].shape[1])
        while True:
            if self.cancelled():
                return "cancelled"
            now = time.perf_counter()
            emitter.timeline.first_token(now)  # a stop id as the first token still ends the wait for one
            if token in rt.stop_ids:
                return "stop"
            sampler.accept(token)
            emitter.token(sampler.kept - 1, token, now)
            if any(s and s in emitter.answer for s in opts.stop):
                return "stop"
            if sampler.kept >= opts.max_new_tokens:
                return "length"
            if routing is not None:  # the next step routes the token just emitted: its phase
                routing.start_decode(emitter.phase)
            token, self.memory_state = decode_step(rt, token, cache, self.memory_state, sampler)
            self.cache_tokens += 1
