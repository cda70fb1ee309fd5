"""The Engine: one per process, owns the loaded model, a bounded fair queue and one worker.

``submit(request)`` validates and converts the inputs (so bad input fails at once,
before queueing), then returns a ``RequestHandle`` whose ``events()`` yields the
request's own event stream. Scheduling: interactive before batch; within a priority,
the session served least recently goes first (round robin across sessions), so one
busy client cannot starve the others. Past ``max_queue`` waiting requests, submit
raises ``EngineBusy``.

Failures stay with their request: a bad request is a ``bad_request`` Error, a CUDA
out-of-memory error fails only that request (kind ``out_of_memory``, cached memory freed),
any other exception is an ``internal`` Error; the worker keeps serving. Per-session state
(recurrent memory, round-robin bookkeeping) is kept for at most ``max_sessions`` sessions.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..config import Limits
from ..events import (
    BadRequest,
    ChatRequest,
    Done,
    EngineBusy,
    Error,
    Event,
    Message,
    Options,
    Queued,
    Stats,
)
from ..families import ModelFamily, family_for
from .generation import Generation
from .handle import RequestHandle, observing
from .inputs import validate_request
from .runtime import Runtime

log = logging.getLogger(__name__)

OOM_MESSAGE = ("the GPU ran out of memory on this request: send a shorter prompt, fewer or smaller images, "
               "or a lower max_new_tokens (max_tokens); the server is still running")


def release_memory() -> None:
    """Free what a failed request left behind: Python garbage, then the CUDA caching allocator's blocks."""
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # a broken device must not take the worker down with it
        log.exception("freeing the CUDA cache failed")


def is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
                                  and "cuda" in str(e).lower())


class Engine:
    def __init__(self, loaded, limits: Limits | None = None, family: ModelFamily | None = None, transcribe=None):
        self.loaded = loaded
        self.limits = limits or Limits()
        self.family = family or family_for(loaded.model)
        # what the loop needs of the model, asked of its family once
        self.rt = Runtime.build(loaded.model, loaded.processor, self.family, self.limits.context_limit)
        self._waiting: list[RequestHandle] = []
        self._last_served: OrderedDict[str, int] = OrderedDict()
        self._serve_tick = 0  # how many requests the worker has started
        self._ids = itertools.count(1)
        self._running: RequestHandle | None = None
        self._generation: Generation | None = None  # the running request's, for kv_cache_usage
        self._memory: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Condition()
        self._closed = False
        self.transcribe = transcribe  # Audio -> str, with --asr-model (for models that do not hear)
        # called with (request, event) for every event of every request, on the thread that puts it
        # (the worker, mostly): the metrics exporter; it must be cheap and must not raise
        self.observers: list[Callable[[ChatRequest, Event], None]] = []
        self._worker = threading.Thread(target=self._work, name="autoglm-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def submit(self, request: ChatRequest) -> RequestHandle:
        request = self._validate(request)
        with self._lock:
            if self._closed:
                raise EngineBusy("the engine is shutting down", retry_after=5.0)
            if len(self._waiting) >= self.limits.max_queue:
                raise EngineBusy(
                    f"the server is busy ({len(self._waiting)} requests waiting): retry in a few seconds",
                    retry_after=max(1.0, 0.5 * len(self._waiting)),
                )
            handle = RequestHandle(request, next(self._ids))
            handle.observe = observing(self.observers)
            # a session never served ranks as if served just before it arrived: it waits behind the
            # sessions that have waited longer, so a stream of new sessions (anonymous API calls)
            # cannot keep returning users (every UI tab after its first turn) waiting
            handle.arrival_tick = self._serve_tick - 0.5
            handle._on_cancel = self._withdraw
            self._waiting.append(handle)
            self._announce_positions()
            self._lock.notify_all()
        return handle

    def run(self, request: ChatRequest) -> list[Event]:
        """Submit and wait: every event of the request, in order."""
        return list(self.submit(request).events())

    def queue_length(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests being generated now (0 or 1: one worker)."""
        return 0 if self._running is None else 1

    @property
    def kv_cache_usage(self) -> float:
        """The share of the context limit the running request's KV cache holds now (0 when idle): the cache
        grows per request, so this is the honest figure behind vllm:kv_cache_usage_perc."""
        gen = self._generation
        return min(gen.cache_tokens / self.rt.context_limit, 1.0) if gen is not None else 0.0

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting (a cancelled request's work is over)."""
        with self._lock:
            return self._running is None and not self._waiting

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for h in self._waiting:
                h.put(Error("the server is shutting down", kind="busy"))
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._lock.notify_all()
        self._worker.join(timeout=10)

    def info(self) -> dict:
        model = self.loaded.model
        return {
            "model_id": self.loaded.model_id,
            "family": self.family.name,
            "quantize": self.loaded.quantize,
            "device_map": getattr(self.loaded, "device_map", None),
            "summary": model.summary() if hasattr(model, "summary") else "",
            "attention": getattr(model.config, "_attn_implementation", "sdpa"),
            "context_limit": self.rt.context_limit,
            "hears_audio": self.family.hears_audio,
            "can_transcribe": self.transcribe is not None,
            **self._card(),
        }

    def _card(self) -> dict:
        """The model card's domain and conversation style (``loading.card``), read once."""
        if not hasattr(self, "_card_facts"):
            from ..loading.card import read_card

            self._card_facts = read_card(getattr(self.loaded.model.config, "_name_or_path", None))
        return self._card_facts

    # ------------------------------------------------------------------ tokenizer
    @property
    def _tokenizer(self):
        return getattr(self.rt.processor, "tokenizer", self.rt.processor)

    def tokenize(self, prompt: str | list[Message], add_special_tokens: bool = True,
                 enable_thinking: bool = True) -> list[int]:
        """The token ids of a text ``prompt`` (the tokenizer alone, with or without its special tokens), or
        of chat messages as a request's prefill would hold them: the same checks as ``submit`` (roles, the
        last message the user's, audio to 16 kHz mono, a transcript for a model that does not hear), the
        first system message and the other turns (as ``fit_context`` takes them), rendered and prepared by
        the family (chat template with the generation prompt; each image and recording expanded to the
        positions the engine gives it). Turns ``fit_context`` would drop to fit the context are counted.
        Runs on the caller's thread; the model is not touched. BadRequest for what the client must fix."""
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        # max_new_tokens=1: no option of the client's is checked here, only the messages
        request = self._validate(ChatRequest(list(prompt), Options(enable_thinking=enable_thinking,
                                                                   max_new_tokens=1)))
        system = [m for m in request.messages if m.role == "system"][:1]
        turns = [m for m in request.messages if m.role != "system"]
        prepared = self.family.prepare(self.rt.processor, system + turns, enable_thinking)
        return [int(i) for i in prepared.inputs["input_ids"][0].tolist()]

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, special tokens included; an id outside the vocabulary is a BadRequest."""
        tok = self._tokenizer
        bad = next((i for i in ids if not 0 <= i < len(tok)), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary: send ids from 0 to {len(tok) - 1}")
        return tok.decode(ids)

    # ------------------------------------------------------------------ validation
    def _validate(self, request: ChatRequest) -> ChatRequest:
        return validate_request(request, self.limits, self.family.hears_audio, self.transcribe)

    # ------------------------------------------------------------------ scheduling
    def _order(self) -> list[RequestHandle]:
        """Waiting requests in the order they will run (simulating round robin)."""
        served = dict(self._last_served)
        pending = list(self._waiting)
        order = []
        tick = itertools.count(10**12)
        while pending:
            nxt = min(pending, key=lambda h: (h.request.priority != "interactive",
                                              served.get(h.request.session_id, h.arrival_tick), h.id))
            order.append(nxt)
            pending.remove(nxt)
            served[nxt.request.session_id] = next(tick)
        return order

    def _announce_positions(self) -> None:
        ahead = 1 if self._running is not None else 0
        for pos, h in enumerate(self._order()):
            position = pos + ahead
            if h.last_position != position:
                h.last_position = position
                h.put(Queued(position))

    def _next(self) -> RequestHandle | None:
        with self._lock:
            while not self._closed:
                self._waiting = [h for h in self._waiting if not self._drop_if_cancelled(h)]
                if self._waiting:
                    h = self._order()[0]
                    self._waiting.remove(h)
                    h._on_cancel = None  # from now on the worker sees the flag within one token
                    self._running = h
                    self._serve_tick += 1
                    self._last_served[h.request.session_id] = self._serve_tick
                    self._last_served.move_to_end(h.request.session_id)
                    waiting = {w.request.session_id for w in self._waiting}
                    for old in [s for s in self._last_served if s not in waiting]:
                        if len(self._last_served) <= self.limits.max_sessions:
                            break
                        del self._last_served[old]  # the least recently served first
                    if h.last_position != 0:
                        h.last_position = 0
                        h.put(Queued(0))
                    self._announce_positions()
                    return h
                self._lock.wait(timeout=0.5)
            return None

    def _withdraw(self, h: RequestHandle) -> None:
        """A waiting request was cancelled (Stop pressed, client gone): it ends at once and the
        requests behind it move up."""
        with self._lock:
            if h in self._waiting:
                self._waiting.remove(h)
                h.put(Done("cancelled"))
                self._announce_positions()

    @staticmethod
    def _drop_if_cancelled(h: RequestHandle) -> bool:
        if h.cancelled:
            h.put(Done("cancelled"))
            return True
        return False

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            h = self._next()
            if h is None:
                return
            error = None
            try:
                self._serve(h)
            except BadRequest as e:
                error = Error(str(e), kind="bad_request")
            except Exception as e:
                if is_out_of_memory(e):  # this request was too big for the device: fail it alone
                    log.warning("request %s ran out of device memory: %s", h.id, str(e).splitlines()[0][:300])
                    error = Error(OOM_MESSAGE, kind="out_of_memory")
                else:  # a bug: keep serving, tell the client plainly
                    log.exception("request %s failed", h.id)
                    error = Error(f"internal error while generating ({type(e).__name__}: {e}); "
                                  "the server is still running, try again", kind="internal")
            finally:
                # the exception (and the tensors its traceback holds) is gone here: free the memory
                # before the client hears of the failure, so its retry finds it free
                if error is not None and error.kind != "bad_request":
                    release_memory()
                elif torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if error is not None:
                    h.put(error)
                with self._lock:
                    self._running = None
                    self._announce_positions()

    def _serve(self, h: RequestHandle) -> None:
        req = h.request
        session = req.session_id
        first_turn = sum(1 for m in req.messages if m.role == "user") == 1
        memory = None if first_turn else self._memory.get(session)
        gen = self._generation = Generation(self.rt, req, h.put, lambda: h.cancelled, memory_state=memory)
        queue_s = time.perf_counter() - h.submitted
        try:
            stats: Stats = gen.run()
        finally:
            self._generation = None
        stats.queue_s = queue_s
        if gen.memory_state is not None:
            self._memory[session] = gen.memory_state
            self._memory.move_to_end(session)
            while len(self._memory) > self.limits.max_sessions:
                self._memory.popitem(last=False)  # the least recently used session's memory
        h.put(stats)
        h.put(Done(stats.finish_reason))
