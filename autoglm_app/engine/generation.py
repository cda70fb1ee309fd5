"""The generation loop, in the gpt-fast shape: ``prefill`` the prompt, then ``decode_step`` one token at a time.

Each forward ends in the one place a token is picked (``Sampler.pick``); ``TokenEmitter`` turns each
kept token into Reasoning / Answer deltas and the Focus and Routing records the probes left on that
forward; ``timing_stats`` turns the request's timeline into Stats. The probes plug in with ``with``
and do not change the loop's shape.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..events import (
    Alternative,
    Answer,
    BadRequest,
    ChatRequest,
    Event,
    Focus,
    LayerRoute,
    Logprobs,
    Message,
    Notice,
    Options,
    Reasoning,
    Routing,
    Stats,
    expert_load,
    routing_summary,
)
from ..families.base import ModelFamily, Prepared
from .probes import FocusProbe, RoutingProbe
from .runtime import Runtime
from .sampling import IncrementalDecoder, Sampler, TokenLogprob
from .stats import Timeline, peak_memory, reset_peak_memory, timing_stats
from .thinksplit import ThinkSplitter

# ----------------------------------------------------------------------------- context


def prompt_tokens(prep: Prepared) -> int:
    return int(prep.inputs["input_ids"].shape[1])


def fit_context(family: ModelFamily, processor, messages: list[Message], opts: Options,
                limit: int, forced: int = 0) -> tuple[Prepared, int]:
    """The prompt, prepared once, after dropping the oldest turns until prompt + max_new_tokens fits;
    never the current turn (``forced``: tokens of the reply fed with the prompt, a branch's start). Returns
    (prepared prompt, turns dropped).

    The usual prompt fits as sent, so it is prepared once and measured by its own ids; only when
    turns have to go are the shorter candidates counted (``family.count_tokens``) and the one that
    fits prepared again. A current turn that alone is too long is the client's to fix: BadRequest.
    """
    budget = limit - opts.max_new_tokens - forced
    system = [m for m in messages if m.role == "system"][:1]
    turns = [m for m in messages if m.role != "system"]
    prep = family.prepare(processor, system + turns, opts.enable_thinking)
    n, dropped = prompt_tokens(prep), 0
    while n > budget:
        # the oldest user turn and everything up to the next user turn go together
        nxt = next((i for i in range(1, len(turns)) if turns[i].role == "user"), None)
        if nxt is None:
            raise BadRequest(
                f"this turn needs {n} prompt tokens plus {opts.max_new_tokens + forced} new tokens, over the "
                f"{limit}-token context: shorten the text, send fewer images or a shorter recording, "
                "or lower max_new_tokens"
            )
        turns = turns[nxt:]
        dropped += 1
        n = family.count_tokens(processor, system + turns, opts.enable_thinking)
    if dropped:
        prep = family.prepare(processor, system + turns, opts.enable_thinking)
    return prep, dropped


def with_reply_start(inputs: dict, forced: list[int], vocab: int) -> dict:
    """The prompt's inputs with the reply's first tokens appended (a branch continued from a chosen token): the
    ids, and every other per-position (1, T) tensor (attention mask 1, type ids 0 = text)."""
    if any(t >= vocab for t in forced):
        raise BadRequest(f"continue_from holds a token id outside the model's vocabulary of {vocab}")
    ids = inputs["input_ids"]
    T = ids.shape[1]
    out = dict(inputs)
    for key, v in inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, T):
            if key == "input_ids":
                extra = torch.tensor([forced], dtype=v.dtype, device=v.device)
            else:
                extra = torch.full((1, len(forced)), 1 if key == "attention_mask" else 0, dtype=v.dtype,
                                   device=v.device)
            out[key] = torch.cat([v, extra], dim=1)
    return out


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


def token_texts(decoder: IncrementalDecoder) -> Callable[[int], tuple[str, bytes]]:
    """id -> the token's own text, decoded alone (the alternatives' labels), and its bytes; remembered per
    tokenizer: a reply with alternatives asks for ~20 ids a token, mostly the same few hundred."""
    tok = decoder.tok
    cache = getattr(tok, "_autoglm_token_texts", None)
    if cache is None:
        cache = {}
        try:
            tok._autoglm_token_texts = cache
        except AttributeError:  # a tokenizer that takes no attributes keeps a cache per request
            pass
    decode = decoder._decode

    def text(token: int) -> tuple[str, bytes]:
        got = cache.get(token)
        if got is None:
            label = decode([token], skip_special_tokens=False)
            got = cache[token] = (label, token_bytes(tok, token, label))
        return got

    return text


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE character -> byte (transformers' table, inverted once)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token: int, label: str) -> bytes:
    """The token's bytes: its text's UTF-8, except for a token holding part of a multi-byte character (its text
    alone is U+FFFD), whose raw bytes come from the vocabulary entry: a byte-level BPE piece (GPT-2's byte to
    character table, as transformers keeps it) or a SentencePiece byte-fallback piece ``<0xNN>``."""
    if "\ufffd" not in label:
        return label.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        table = _byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return label.encode("utf-8")


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
        self.token_text = token_texts(decoder)
        self.phase = splitter.phase  # of the newest token (the RoutingProbe's by_phase split)

    def token(self, index: int, token: int, now: float, focus: np.ndarray | None = None,
              route: tuple[np.ndarray, np.ndarray] | None = None, logprob: TokenLogprob | None = None) -> None:
        """Emit one kept token; ``focus`` / ``route``: that forward's telemetry from a batched step (else the
        probes' hooks hold it); ``logprob``: the sampler's record of it, when the request asked."""
        delta = self.decoder.push(token)
        pieces = self.splitter.feed(delta)
        phase = pieces[-1][0] if pieces else self.splitter.phase
        self.phase = phase
        self.timeline.piece(phase, now)
        self.pieces(pieces)
        if logprob is not None:
            text = self.token_text
            label, raw = text(token)
            top = []
            for t, v in zip(logprob.top_ids.tolist(), logprob.top_logprobs.tolist()):
                alt_label, alt_raw = text(t)
                top.append(Alternative(alt_label, t, v, alt_raw))
            self.emit(Logprobs(index, label, token, logprob.logprob, logprob.entropy, top, phase, raw))
        if self.focus is not None:
            self._focus(index, delta, phase, focus)
        if self.routing is not None:
            # its counts are filled in when it is delivered (Generation.flush): at most one snapshot per delivery
            if route is None:
                self.emit(Routing(index, delta, phase, [LayerRoute(*r) for r in self.routing.collect()], None))
            else:  # a batched step's: its LayerRoute list is built by whoever reads it
                self.routing.fold_step(*route)
                self.emit(Routing(index, delta, phase, None, None, route=(self.routing.layer_ids, *route)))

    def replay(self, tokens: list[int]) -> None:
        """Tokens the reply already starts with (a branch): through the text decoder and the think splitter, so
        the new tokens continue their text and phase; their text is emitted (the reply reads whole), their
        telemetry is not (it is the earlier answer's; the new tokens are numbered after them)."""
        for token in tokens:
            self.pieces(self.splitter.feed(self.decoder.push(token)))
        self.phase = self.splitter.phase

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

    def _focus(self, index: int, token: str, phase: str, per_layer: np.ndarray | None) -> None:
        if per_layer is None:
            per_layer = self.focus.take()
        if per_layer.size == 0:
            return
        # the maps are cut and aggregated by whoever reads them (Focus), not here on the decode loop
        self.emit(Focus(index, token, phase, rows=per_layer, spans=self.focus.shapes, rule=(self.rule, self.layers)))


# ----------------------------------------------------------------------------- one request

# A request's events reach its reader at most this often while it decodes (and at its end): every delivery
# wakes the reading thread or event loop, which on two cores cost the worker about 50 us a token plus the
# interpreter lock handed back and forth (measured with cProfile on the demo model at ~700 tokens/s); 4 ms
# holds back at most a few tokens, below what a reader of a stream can see.
DELIVER_EVERY_S = 0.004
# The routing counts (ExpertCounts) are snapshot at most this often, on a delivery, and always at a forced one (the
# first token, the end): a snapshot folds the tokens waiting in the probe and copies its counts, about 0.1 ms a time
# on the worker on two cores (measured in the decode loop on the demo model; a third of the host's probe work when
# it came with every 4 ms delivery). Every consumer reads the newest counts only (the page redraws at most every
# 0.2 s), and the request's newest Routing event always has its final counts when its Stats arrive (``end``).
COUNTS_EVERY_S = 0.05


class Generation:
    """One request on the loaded model, in the steps the worker drives: ``begin()`` fits and prefills the
    prompt (the probes on, through the model's own forward) and emits the first token; then, one token at a
    time, ``forward_one()`` (this request's own forward over its own cache) or a batched decoder's step,
    each token handed to ``accept``; ``end(finish)`` emits nothing and returns the Stats. ``run()`` is the
    whole of it alone. ``memory_state`` is the model's recurrent memory after it (AutoGLM), for the
    session's next turn.

    The decode-step telemetry arrives either from the hooks (``forward_one``: FocusProbe and RoutingProbe
    read during the forward) or ready-made from a batched step (``accept(..., focus=, route=)``)."""

    def __init__(self, rt: Runtime, request: ChatRequest, emit: Callable[[list[Event]], None],
                 cancelled: Callable[[], bool], memory_state=None):
        """``emit`` takes a list of events, delivered together (a token's text, focus and routing: one
        ``RequestHandle.put_all``)."""
        self.rt, self.req, self.deliver, self.cancelled = rt, request, emit, cancelled
        self._out: list[Event] = []  # events not yet delivered (see flush)
        self._delivered = 0.0
        self._counted = float("-inf")  # when the routing counts were last snapshot (COUNTS_EVERY_S): never yet
        self._uncounted: Routing | None = None  # the newest delivered Routing event, while it has no counts
        self.emit = self._out.append
        self.memory_state = memory_state
        self.cache_tokens = 0  # tokens in this request's KV cache now (the prompt, then one per decode step)
        self.cache: DynamicCache | None = None  # its own cache while it decodes through forward_one
        self.cache_row = 0  # the row of ``cache`` that is this request's (a batched prefill's cache has several)
        self.token: int | None = None  # the next token to feed (chosen, not yet forwarded)
        self.finish: str | None = None

    # ------------------------------------------------------------------ begin
    @torch.inference_mode()
    def begin(self) -> str | None:
        """Fit and prefill the prompt, emit the first token: None while it goes on, else the finish reason."""
        return self.started(*self.prefill_alone(self.prepare()))

    @torch.inference_mode()
    def prefill_alone(self, inputs: dict) -> tuple[int, object]:
        """The prepared prompt in a forward of its own, with this request's probes -> (first token, memory)."""
        self.cache, self.cache_row = DynamicCache(), 0
        with self._probes():
            return prefill(self.rt, inputs, self.cache, self.memory_state, self.sampler)

    def prepare(self) -> dict:
        """Everything before the prefill's forward: the prompt fitted to the context (a Notice if turns were
        dropped), its sampler, probes and emitter -> the forward's inputs, on the model's device. A batched
        prefill (``prefill_batch``) calls this for each of its requests, then ``started``."""
        rt, opts = self.rt, self.req.options
        self.timeline = Timeline(time.perf_counter())
        forced = list(self.req.continue_from)
        prep, dropped = fit_context(rt.family, rt.processor, self.req.messages, opts, rt.context_limit,
                                    len(forced))
        if dropped:
            self.emit(Notice(f"the conversation was too long for the {rt.context_limit}-token context: "
                             f"the oldest {dropped} turn(s) were left out of this answer"))
        self.prep = prep
        inputs = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
        if forced:
            inputs = with_reply_start(inputs, forced, rt.model.get_input_embeddings().num_embeddings)
        self.focus_rule = rt.focus_rule(opts)
        self.sampler = Sampler(opts, inputs["input_ids"][0], rt.banned_ids, rt.stop_list, len(forced))
        self.focus = (FocusProbe(rt.attention_modules, prep.image_spans, prep.audio_spans)
                      if opts.focus and (prep.image_spans or prep.audio_spans) else None)
        self.routing = RoutingProbe(rt.routers, rt.num_experts, rt.top_k, rt.family.read_route) \
            if opts.routing and rt.routers else None
        if self.routing is not None:  # (a branch's reply start is text)
            self.routing.modality = torch.from_numpy(np.concatenate([prep.modality,
                                                                     np.zeros(len(forced), prep.modality.dtype)]))
        self.emitter = TokenEmitter(self.emit, IncrementalDecoder(rt.processor.tokenizer),
                                    ThinkSplitter(opts.enable_thinking, rt.family.think_open, rt.family.think_close,
                                                  rt.family.answer_tags, opened=prep.thinking_open),
                                    self.timeline, self.focus, self.routing, self.focus_rule)
        self.emitter.replay(forced)
        self.cache_tokens = int(inputs["input_ids"].shape[1])
        return inputs

    def started(self, token: int, memory_state) -> str | None:
        """The prefill's first token (its probes' records are in place): emit it. ``self.cache`` holds the
        prompt's keys and values (row ``cache_row`` of a batched prefill's cache)."""
        self.memory_state = memory_state
        self.flush()  # the Notice, if any, before the first token's work
        return self.accept(token, time.perf_counter())

    def flush(self, force: bool = True) -> None:
        """Deliver the events emitted since the last delivery, together; unless ``force``, only once
        ``DELIVER_EVERY_S`` has passed since the last one (the first token and the end always go at once; the
        worker forces a delivery before a long pause, another request's prefill)."""
        if not self._out:
            return
        now = time.perf_counter()
        if not force and now - self._delivered < DELIVER_EVERY_S:
            return
        events = list(self._out)
        self._out.clear()
        self._delivered = now
        if self.routing is not None:
            self._count(events, force or now - self._counted >= COUNTS_EVERY_S)
        self.deliver(events)

    def _count(self, events: list[Event], snapshot: bool) -> None:
        """The Routing events of a delivery share the counts as of its last token when a snapshot is due; else they
        go without (None: consumers keep the newest counts they have) and the newest is remembered for ``end``."""
        routings = [e for e in events if isinstance(e, Routing) and e.counts is None]
        if not routings:
            return
        if snapshot:
            counts = self.routing.counts()
            for e in routings:
                e.counts = counts
            self._counted, self._uncounted = time.perf_counter(), None
        else:
            self._uncounted = routings[-1]

    def _probes(self) -> contextlib.ExitStack:
        """The hooks of this request's probes, for the forwards that run through the model's own forward."""
        stack = contextlib.ExitStack()
        for probe in (self.focus, self.routing):
            if probe is not None:
                stack.enter_context(probe)
        return stack

    @property
    def media_keys(self) -> torch.Tensor | None:
        """(K,) the cache positions of the prompt's image / audio keys, or None (no focus asked or nothing to see)."""
        return self.focus.positions if self.focus is not None else None

    # ------------------------------------------------------------------ one token
    def accept(self, token: int, now: float, focus: np.ndarray | None = None,
               route: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
        """The token the last forward chose: stop, or emit it with that forward's telemetry (``focus`` (layers, K)
        and ``route`` (experts (layers, k), weights) from a batched step; else what the hooks read) and keep
        it as the next token to feed. Returns the finish reason, or None to go on."""
        try:
            finish = self._accept(token, now, focus, route)
        except BaseException:
            self.flush()
            raise
        self.flush(force=finish is not None)
        return finish

    def _accept(self, token: int, now: float, focus, route) -> str | None:
        opts, emitter = self.req.options, self.emitter
        if self.cancelled():  # what was held back is not wanted any more either
            self._out.clear()
            return self._end("cancelled")
        emitter.timeline.first_token(now)  # a stop id as the first token still ends the wait for one
        if token in self.rt.stop_ids:
            return self._end("stop")
        self.sampler.accept(token)
        emitter.token(self.sampler.kept - 1, token, now, focus, route, self.sampler.last)
        if any(s and s in emitter.answer for s in opts.stop):
            return self._end("stop")
        if self.sampler.new_tokens >= opts.max_new_tokens:
            return self._end("length")
        if self.routing is not None:  # the next step routes the token just emitted: its phase
            self.routing.start_decode(emitter.phase)
        self.token = token
        return None

    def _end(self, finish: str) -> str:
        self.finish = finish
        self.cache = None  # the memory goes as soon as the answer ends
        return finish

    @torch.inference_mode()
    def forward_one(self) -> str | None:
        """Feed the kept token through the model's own forward and this request's own cache; accept the next."""
        with self._probes():
            token, self.memory_state = decode_step(self.rt, self.token, self.cache, self.memory_state, self.sampler)
        self.cache_tokens += 1
        return self.accept(token, time.perf_counter())

    # ------------------------------------------------------------------ end
    def end(self) -> Stats:
        """The request's Stats (its answer's held-back text emitted first)."""
        self.emitter.finish()
        self.flush()
        focus, routing = self.focus, self.routing
        if self._uncounted is not None:  # (a stop id ended it after a delivery without a snapshot): the final counts
            self._uncounted.counts = routing.counts()  # set before the Stats are put, which readers see after it
            self._uncounted = None
        stats = timing_stats(
            self.timeline, time.perf_counter(), reasoning_tokens=self.timeline.reasoning,
            answer_tokens=self.timeline.answer, completion_tokens=self.sampler.new_tokens,
            prompt_tokens=prompt_tokens(self.prep), finish_reason=self.finish,
            attention=focus.mode if focus is not None else "sdpa", peak_memory=peak_memory(),
        )
        if routing is not None and routing.tokens["prefill"]:  # what the turn's last Routing event said
            stats.routing = routing_summary(expert_load(routing.counts()))
        return stats

    def run(self) -> Stats:
        """The whole request alone, through the model's own forward."""
        reset_peak_memory()
        finish = self.begin()
        while finish is None:
            finish = self.forward_one()
        return self.end()
