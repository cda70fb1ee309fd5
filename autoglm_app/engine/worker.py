"""The Engine: one per process, owns the loaded model, a bounded fair queue and one worker that decodes
every admitted request together (continuous batching, ``engine.decoding``).

``submit(request)`` validates and converts the inputs (so bad input fails at once,
before queueing), then returns a ``RequestHandle`` whose ``events()`` yields the
request's own event stream. Scheduling: interactive before batch; within a priority,
the session served least recently goes first (round robin across sessions), so one
busy client cannot starve the others. Past ``max_queue`` waiting requests, submit
raises ``EngineBusy``. Up to ``max_batch`` requests are in flight at once: waiting requests are
admitted (prefilled, their first tokens emitted) between two steps as soon as slots are free, those taken
together in one prefill forward where the decoder allows (``engine.prefill``), and a
request that ends or is cancelled frees its slot at the next step; the others go on undisturbed.

Failures stay with their request: a bad request is a ``bad_request`` Error, a CUDA
out-of-memory error fails only that request (kind ``out_of_memory``, cached memory freed),
any other exception is an ``internal`` Error; the worker keeps serving. Per-session state
(recurrent memory, round-robin bookkeeping) is kept for at most ``max_sessions`` sessions.
"""

from __future__ import annotations

import gc
import itertools
from concurrent.futures import Future
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
from ..memory import device_memory, return_free_memory
from .decoding import make_decoder
from .generation import Generation
from .prefill import batch_key, prefill_batch
from .handle import RequestHandle, observing
from .inputs import validate_request
from .runtime import Runtime
from .stats import reset_peak_memory

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
    def __init__(self, loaded, limits: Limits | None = None, family: ModelFamily | None = None, transcribe=None,
                 max_batch: int = 0, compile: str = "off", progress=None):
        self.loaded = loaded
        self.limits = limits or Limits()
        self.family = family or family_for(loaded.model)
        # what the loop needs of the model, asked of its family once
        self.rt = Runtime.build(loaded.model, loaded.processor, self.family, self.limits.context_limit)
        # how the requests in flight advance: one batched static-cache step, or each its own forward
        self.decoder = make_decoder(self.rt, max_batch, compile, progress)
        d = self.decoder
        log.info("decoding: %s, %d slots of %d tokens, KV cache %.2f GiB (kv_bytes=%d)",
                 "one batched static-cache step" if d.batched else "each request through its own forward",
                 d.max_batch, self.rt.context_limit, d.kv_bytes / 2**30, d.kv_bytes)
        self._waiting: list[RequestHandle] = []
        self._last_served: OrderedDict[str, int] = OrderedDict()
        self._serve_tick = 0  # how many requests the worker has started
        self.prefill_forwards = 0  # forwards that prefilled requests (several requests in one, when batched)
        self._ids = itertools.count(1)
        self._active: list[tuple[RequestHandle, Generation]] = []  # in flight; the i-th holds slot i
        self._memory: OrderedDict[str, list] = OrderedDict()
        self._jobs: list[tuple[Callable, Future]] = []  # call(): work that must run where nothing else uses the model
        self._lock = threading.Condition()
        self._closed = False
        self.transcribe = transcribe  # Audio -> str, with --asr-model (for models that do not hear)
        # called with (request, event) for every event of every request, on the thread that puts it
        # (the worker, mostly): the metrics exporter; it must be cheap and must not raise
        self.observers: list[Callable[[ChatRequest, Event], None]] = []
        # how a request's handle is made: the process engine's child makes handles that send their events
        # to the parent instead of queueing them here
        self.new_handle: Callable[[ChatRequest, int], RequestHandle] = RequestHandle
        self._worker = threading.Thread(target=self._work, name="autoglm-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        return self._worker.is_alive() and not self._closed

    def submit(self, request: ChatRequest, request_id: int | None = None) -> RequestHandle:
        """Queue ``request``; its handle streams the events. ``request_id``: the id its handle gets (the
        process engine's parent numbers its requests itself); by default the next of this engine's own."""
        request = self._validate(request)
        with self._lock:
            if self._closed:
                raise EngineBusy("the engine is shutting down", retry_after=5.0)
            if len(self._waiting) >= self.limits.max_queue:
                raise EngineBusy(
                    f"the server is busy ({len(self._waiting)} requests waiting): retry in a few seconds",
                    retry_after=max(1.0, 0.5 * len(self._waiting)),
                )
            handle = self.new_handle(request, next(self._ids) if request_id is None else request_id)
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

    def call(self, fn: Callable[[], object], timeout: float | None = None):
        """Run ``fn()`` on the worker thread between two decode steps and return its result (or raise its
        exception). Why: the probes plug into the model's modules (``focus_probe`` slots, router hooks), so a
        forward of one's own (engine.compare's teacher-forced pass) must not overlap the worker's forwards;
        the requests in flight wait one step's worth of time, none is disturbed."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineBusy("the engine is shutting down", retry_after=5.0)
            self._jobs.append((fn, future))
            self._lock.notify_all()
        return future.result(timeout)

    def _run_jobs(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for fn, future in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the caller gets it; the worker goes on serving
                    future.set_exception(e)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests being generated now (up to ``max_batch``)."""
        return len(self._active)

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    @property
    def kv_cache_usage(self) -> float:
        """The share of the KV slots' positions the requests in flight hold now (0 when idle): what is behind
        vllm:kv_cache_usage_perc (each of ``max_batch`` slots holds up to the context limit)."""
        used = sum(g.cache_tokens for _, g in list(self._active))
        return min(used / (self.decoder.max_batch * self.rt.context_limit), 1.0)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting (a cancelled request's work is over)."""
        with self._lock:
            return not self._active and not self._waiting

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for h in self._waiting:
                h.put(Error("the server is shutting down", kind="busy"))
            self._waiting.clear()
            for h, _ in self._active:
                h.cancel()
            for _, future in self._jobs:
                future.cancel()
            self._jobs.clear()
            self._lock.notify_all()
        self._worker.join(timeout=10)

    def memory(self) -> dict[str, int]:
        """Memory in use now where the model is: per GPU, or this process's resident set (the Model panel)."""
        return device_memory()

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
            "decoding": self.decoding(),
            "can_transcribe": self.transcribe is not None,
            **self._card(),
        }

    def decoding(self) -> dict:
        """How requests are decoded: batched static-cache step or per request, compiled, slots, KV bytes."""
        d = self.decoder
        return {"batched": d.batched, "compiled": d.compiled, "compile_warmup_s": round(d.warmup_s, 2), "step": getattr(d, "step_name", getattr(d, "variant", "per request")),
                "step_ms": {k: round(v, 3) for k, v in getattr(d, "timings", {}).items()},
                "one_row_as_two": getattr(d, "pad_one", False), "max_batch": d.max_batch, "kv_bytes": d.kv_bytes, "note": d.note}

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
        ahead = 1 if self._active else 0
        for pos, h in enumerate(self._order()):
            position = pos + ahead
            if h.last_position != position:
                h.last_position = position
                h.put(Queued(position))

    def _take(self, block: bool) -> RequestHandle | None:
        """The next waiting request in the fair order, now taken off the queue; None when there is none (at
        once unless ``block``: then wait for one, None only when the engine closes)."""
        with self._lock:
            while not self._closed:
                self._waiting = [h for h in self._waiting if not self._drop_if_cancelled(h)]
                if self._waiting:
                    h = self._order()[0]
                    self._waiting.remove(h)
                    h._on_cancel = None  # from now on the worker sees the flag within one token
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
                    return h
                if not block or self._jobs:  # a call() waits: the worker runs it first
                    return None
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
        """Admit waiting requests while there are free slots (each prefilled, its first token out), then
        one step for every request in flight; a request that ends leaves its slot to the next."""
        while True:
            if self._jobs:
                self._run_jobs()
            while len(self._active) < self.decoder.max_batch:
                taken = self._take_many(self.decoder.max_batch - len(self._active), block=not self._active)
                if not taken:
                    break
                self._admit(taken)
            if not self._active:
                if self._closed:
                    return
                continue
            try:
                results = self.decoder.step([g for _, g in self._active])
            except Exception as e:  # the batched step itself failed: every request in it fails alike
                results = [e] * len(self._active)
            self._settle(results)

    def _take_many(self, n: int, block: bool) -> list[RequestHandle]:
        """Up to ``n`` waiting requests in the fair order (waiting for the first one if ``block``)."""
        taken: list[RequestHandle] = []
        h = self._take(block)
        while h is not None:
            taken.append(h)
            if len(taken) >= n:
                break
            h = self._take(False)
        return taken

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill the requests ``handles`` (together where the decoder and their inputs allow: ``prefill``) and emit
        each one's first token; each joins the batch unless that already ended it."""
        gens = []
        for h in handles:
            req = h.request
            first_turn = sum(1 for m in req.messages if m.role == "user") == 1
            memory = None if first_turn else self._memory.get(req.session_id)
            gen = Generation(self.rt, req, h.put_all, lambda h=h: h.cancelled, memory_state=memory)
            gen.queue_s = time.perf_counter() - h.submitted
            gens.append(gen)
        for _, running in self._active:  # what they hold back reaches their readers before this prefill
            running.flush()
        if not self._active:
            reset_peak_memory()  # a request's peak is the batch's while it ran: reset only when none was running
        with self._lock:
            first_slot = len(self._active)
            self._active.extend(zip(handles, gens))
            self._announce_positions()
        results: list = [None] * len(gens)
        groups: dict = {}  # batch key -> [(index, prepared inputs)]
        for i, gen in enumerate(gens):
            try:
                inputs = gen.prepare()
            except Exception as e:
                results[i] = e
                continue
            key = batch_key(inputs) if self.decoder.batched_prefill and len(gens) > 1 else None
            groups.setdefault(key if key is not None else ("alone", i), []).append((i, inputs))
        for group in groups.values():
            firsts = None
            if len(group) > 1:
                try:
                    firsts = prefill_batch(self.rt, [gens[i] for i, _ in group], [x for _, x in group])
                except Exception:  # (too big together, say): each alone, where its own failure stays its own
                    log.warning("a batched prefill of %d requests failed; prefilling them one by one", len(group),
                                exc_info=True)
                    release_memory()
            for j, (i, inputs) in enumerate(group):
                gen = gens[i]
                try:
                    token, memory = firsts[j] if firsts is not None else gen.prefill_alone(inputs)
                    results[i] = gen.started(token, memory)
                    if results[i] is None:
                        self.decoder.admit(first_slot + i, gen)
                except Exception as e:
                    results[i] = e
        self.prefill_forwards += len(groups)
        self._settle([None] * first_slot + results)

    def _settle(self, results: list) -> None:
        """Each request in flight, by ``results`` (None: goes on; a finish reason; an exception): those that
        ended get their Stats and Done (or an Error), and their slots are handed to the last requests."""
        ended = [i for i, r in enumerate(results) if r is not None]
        failed = False
        for i in ended:
            h, gen = self._active[i]
            failed |= self._end(h, gen, results[i])
        if not ended:
            return
        # pack the batch at the front: each freed slot takes the last running request
        keep = [i for i, r in enumerate(results) if r is None]
        with self._lock:
            active = self._active
            for slot, src in enumerate(keep):
                if src != slot:
                    self.decoder.move(src, slot, active[src][1])
            self._active = [active[i] for i in keep]
            self._announce_positions()
        if failed:
            release_memory()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._active:  # the batch ran dry: what its temporaries left in the heap goes back
            return_free_memory()

    def _end(self, h: RequestHandle, gen: Generation, result) -> bool:
        """Finish one request: Stats and Done, or the Error its exception means. True if it failed."""
        if not isinstance(result, BaseException):
            try:
                stats: Stats = gen.end()
                stats.queue_s = gen.queue_s
                if gen.memory_state is not None:
                    self._memory[h.request.session_id] = gen.memory_state
                    self._memory.move_to_end(h.request.session_id)
                    while len(self._memory) > self.limits.max_sessions:
                        self._memory.popitem(last=False)  # the least recently used session's memory
                h.put(stats)
                h.put(Done(stats.finish_reason))
                return False
            except Exception as e:
                result = e
        gen.cache = None
        if isinstance(result, BadRequest):
            h.put(Error(str(result), kind="bad_request"))
            return False
        if is_out_of_memory(result):  # this request was too big for the device: fail it alone
            log.warning("request %s ran out of device memory: %s", h.id, str(result).splitlines()[0][:300])
            h.put(Error(OOM_MESSAGE, kind="out_of_memory"))
        else:  # a bug: keep serving, tell the client plainly
            log.error("request %s failed", h.id, exc_info=result)
            h.put(Error(f"internal error while generating ({type(result).__name__}: {result}); "
                        "the server is still running, try again", kind="internal"))
        return True
