"""ProcessEngine: the Engine's public surface, with the engine itself in a child process of its own.

Why a process: the engine's worker thread and the web server's event loop used to share one interpreter,
so every millisecond of Python the server spent on a stream (parsing, building and writing SSE chunks, the
page's rendering) was a millisecond the decode loop waited for the interpreter lock. Measured on two cores
(docs/PERFORMANCE.md): the same engine decoded the demo model at 431 tok/s on its own and at 215 tok/s
through ``/v1``, and a second thread that took the lock for 0.1 ms in every 0.5 ms slowed it from 391 to
276 tok/s. A child process has its own interpreter (and its own core): the model, the queue, the worker,
the probes and the speech-to-text model live there, and the web server only renders.

The wire is one ``multiprocessing`` pipe (pickled tuples):

    parent -> child   ("submit", rid, request)   ("cancel", rid)   ("call", cid, name, args)   ("close",)
    child -> parent   ("progress", method, args) while loading, then ("ready", info) or ("failed", error);
                      ("events", rid, events)    one delivery of one request (a token's text, focus, routing)
                      ("accepted", rid, error)   the answer to a submit: None, or BadRequest / EngineBusy / ...
                      ("result", cid, ok, value) the answer to a call (tokenize, transcribe, running, ...)

The child's engine makes ``ForwardingHandle``s: the worker's ``put_all`` pickles the delivery straight onto
the pipe (no thread hand-off in the child: a thread wake-up costs the worker about 0.1 ms through the lock).
The parent's receiver thread puts each delivery into an ordinary ``RequestHandle``, so the page, the API and
the metrics read the same handles, events and cancellation as from the in-process engine. Submits and calls
run on a small pool in the child, so a slow one (a recording transcribed during validation) holds up
nothing else. If the child ends (killed, out of memory), every open request gets an Error and ``ready``
turns False, so /health answers 503.

Compare mode needs both models' forwards in one process (``Engine.call``): it keeps the in-process engine.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..events import ChatRequest, EngineBusy, Error, Event
from ..loading.progress import LoadProgress, reporting
from .handle import TERMINAL, RequestHandle, observing

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 120.0  # a call's answer (a transcription of a long recording included)
STATE_TIMEOUT_S = 5.0  # running / idle / queue length: the metrics and /health ask these
CLOSE_TIMEOUT_S = 15.0


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (BadRequest, EngineBusy with its retry_after, SystemExit), else a
    RuntimeError that carries its type and message: the parent must always be able to read the answer."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if isinstance(error, EngineBusy):
            copy.retry_after = error.retry_after
        return error if type(copy) is type(error) else RuntimeError(f"{type(error).__name__}: {error}")
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _Wire:
    """One end of the pipe; ``send`` may be called from any thread. False once the other end is gone."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.open = True

    def send(self, message: tuple) -> bool:
        if not self.open:
            return False
        try:
            with self.lock:
                self.conn.send(message)
            return True
        except (OSError, EOFError, ValueError):  # the other process is gone, or the pipe is closed
            self.open = False
            return False


# ----------------------------------------------------------------------------- the child's side


class ForwardedProgress(LoadProgress):
    """The child's load progress: kept here as usual and each loader-side update sent to the parent's."""

    def __init__(self, wire: _Wire, model: str = ""):
        super().__init__(model)
        self.wire = wire

    def stage(self, name: str, total: int = 0, unit: str = "") -> None:
        super().stage(name, total, unit)
        self.wire.send(("progress", "stage", (name, total, unit)))

    def expect(self, n: int, unit: str | None = None) -> None:
        super().expect(n, unit)
        self.wire.send(("progress", "expect", (n, unit)))

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        self.wire.send(("progress", "advance", (n,)))


class ForwardingHandle(RequestHandle):
    """A request's handle in the child: its events go to the parent, tagged with the parent's id."""

    def __init__(self, wire: _Wire, finished, request: ChatRequest, request_id: int):
        super().__init__(request, request_id)
        self.wire, self.finished = wire, finished

    def put(self, event: Event) -> None:
        self.put_all([event])

    def put_all(self, events: list[Event]) -> None:
        if not events:
            return
        self.wire.send(("events", self.id, tuple(events)))
        if isinstance(events[-1], TERMINAL):
            self.finished(self.id)


def child_main(build, settings, conn) -> None:
    """The child process: build the engine with ``build(settings, progress)`` (``server.build_local_engine``),
    say ready, then serve the parent's messages until it closes the pipe or says close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # the parent's progress logs each stage it is sent: the child's own copy stays quiet
    logging.getLogger("autoglm_app.loading.progress").setLevel(logging.WARNING)
    wire = _Wire(conn)
    progress = ForwardedProgress(wire, getattr(settings, "model", ""))
    try:
        with reporting(progress):
            engine = build(settings, progress)
    except BaseException as e:  # noqa: BLE001  (SystemExit from the loader included: the parent shows it)
        log.error("the engine did not load: %s", e, exc_info=not isinstance(e, SystemExit))
        wire.send(("failed", portable(e)))
        return
    _ChildServer(engine, wire).serve(conn)


class _ChildServer:
    def __init__(self, engine, wire: _Wire):
        self.engine, self.wire = engine, wire
        self.handles: dict[int, RequestHandle] = {}
        self.cancelled_early: set[int] = set()  # cancels that overtook their submit on the pool
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="autoglm-engine-rpc")
        engine.new_handle = lambda request, rid: ForwardingHandle(wire, self._finished, request, rid)

    def _finished(self, rid: int) -> None:
        with self.lock:
            self.handles.pop(rid, None)

    def serve(self, conn) -> None:
        self.wire.send(("ready", self.engine.info()))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = message[0]
            if kind == "submit":
                self.pool.submit(self._submit, message[1], message[2])
            elif kind == "cancel":
                with self.lock:
                    h = self.handles.get(message[1])
                    if h is None:
                        self.cancelled_early.add(message[1])
                if h is not None:
                    h.cancel()
            elif kind == "call":
                self.pool.submit(self._call, message[1], message[2], message[3])
            elif kind == "close":
                break
        self.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.wire.send(("closed",))

    def _submit(self, rid: int, request: ChatRequest) -> None:
        try:
            h = self.engine.submit(request, request_id=rid)
        except BaseException as e:  # noqa: BLE001  (the parent's submit raises it)
            self.wire.send(("accepted", rid, portable(e)))
            return
        with self.lock:
            self.handles[rid] = h
            cancel = rid in self.cancelled_early
            self.cancelled_early.discard(rid)
        self.wire.send(("accepted", rid, None))
        if cancel:
            h.cancel()

    def _call(self, cid: int, name: str, args: tuple) -> None:
        try:
            value = getattr(self.engine, name)
            if callable(value):
                value = value(*args)
            self.wire.send(("result", cid, True, value))
        except BaseException as e:  # noqa: BLE001
            self.wire.send(("result", cid, False, portable(e)))


# ----------------------------------------------------------------------------- the parent's side


class ProcessEngine:
    """The engine in a child process (see the module's docstring); the same surface as ``Engine`` but for
    ``call`` and the model objects (``loaded``, ``rt``, ``decoder``), which stay in the child.

    ``build(settings, progress)`` runs in the child (a module-level function: it is pickled by name) and
    returns the ``Engine``. The constructor returns once the engine is ready, forwarding the load's stages
    and counts to ``progress``; a load that fails raises its error here."""

    def __init__(self, build, settings, progress: LoadProgress | None = None):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks or CUDA state
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(target=child_main, args=(build, settings, child), name="autoglm-engine",
                                        daemon=True)
        self._process.start()
        child.close()
        self._wire = _Wire(self._conn)
        self._info = self._wait_ready(progress)
        self._handles: dict[int, RequestHandle] = {}
        self._accepted: dict[int, Future] = {}
        self._results: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)
        self._closed = False
        self._gone: str | None = None  # why the child is gone, once it is
        self.observers: list = []  # (request, event) callables, as on Engine: the metrics exporter
        self.transcribe = self._transcribe if self._info.get("can_transcribe") else None
        self._receiver = threading.Thread(target=self._receive, name="autoglm-engine-pipe", daemon=True)
        self._receiver.start()
        log.info("the engine runs in its own process (pid %d)", self._process.pid)

    def _wait_ready(self, progress: LoadProgress | None) -> dict:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._process.join(timeout=5)
                raise RuntimeError(f"the engine process ended while loading (exit code {self._process.exitcode}); "
                                   "its log above says why") from None
            kind = message[0]
            if kind == "progress":
                if progress is not None:
                    getattr(progress, message[1])(*message[2])
            elif kind == "ready":
                return message[1]
            elif kind == "failed":
                self._process.join(timeout=10)
                raise message[1]

    # ------------------------------------------------------------------ the pipe
    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                h = self._handles.get(message[1])
                if h is not None:
                    h.put_all(message[2])
                    if isinstance(message[2][-1], TERMINAL):
                        with self._lock:
                            self._handles.pop(message[1], None)
            elif kind == "accepted":
                with self._lock:
                    future = self._accepted.pop(message[1], None)
                if future is not None:
                    future.set_result(message[2])
            elif kind == "result":
                with self._lock:
                    future = self._results.pop(message[1], None)
                if future is not None:
                    future.set_result((message[2], message[3]))
            elif kind == "closed":
                break
        self._ended()

    def _ended(self) -> None:
        """The child is gone (closed, killed, crashed): every open request ends with an Error."""
        self._process.join(timeout=CLOSE_TIMEOUT_S if self._closed else 1)
        code = self._process.exitcode
        self._gone = "closed" if self._closed else f"exit code {code}"
        if not self._closed:
            log.error("the engine process ended unexpectedly (%s): the server answers 503 until it is restarted",
                      self._gone)
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
            futures = [*self._accepted.values(), *self._results.values()]
            self._accepted, self._results = {}, {}
        message = ("the server is shutting down" if self._closed else
                   f"the engine process ended unexpectedly ({self._gone}); restart the server")
        for h in handles:
            h.put(Error(message, kind="busy" if self._closed else "internal"))
        for future in futures:
            if not future.done():
                future.set_exception(EngineBusy(message, retry_after=5.0))

    def _ask(self, name: str, *args, timeout: float = CALL_TIMEOUT_S):
        """``engine.<name>(*args)`` (or the attribute) in the child, and its answer (its exception raised)."""
        future: Future = Future()
        with self._lock:
            if self._gone is not None or self._closed:
                raise EngineBusy("the engine is not running", retry_after=5.0)
            cid = next(self._calls)
            self._results[cid] = future
        if not self._wire.send(("call", cid, name, args)):
            with self._lock:
                self._results.pop(cid, None)
            raise EngineBusy("the engine process is gone", retry_after=5.0)
        ok, value = future.result(timeout)
        if not ok:
            raise value
        return value

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        return self._gone is None and not self._closed and self._process.is_alive()

    def submit(self, request: ChatRequest) -> RequestHandle:
        accepted: Future = Future()
        with self._lock:
            if self._closed or self._gone is not None:
                raise EngineBusy("the engine is shutting down" if self._closed else
                                 f"the engine process ended ({self._gone}); restart the server", retry_after=5.0)
            rid = next(self._ids)
            handle = RequestHandle(request, rid)
            handle.observe = observing(self.observers)
            self._handles[rid] = handle  # before the submit: its first events may come before the answer
            self._accepted[rid] = accepted
        if not self._wire.send(("submit", rid, request)):
            with self._lock:
                self._handles.pop(rid, None)
                self._accepted.pop(rid, None)
            raise EngineBusy("the engine process is gone", retry_after=5.0)
        error = accepted.result(CALL_TIMEOUT_S)
        if error is not None:
            with self._lock:
                self._handles.pop(rid, None)
            raise error
        handle._on_cancel = self._cancel  # every cancel goes to the child (queued or running)
        if handle.cancelled:  # cancelled between the send and the answer
            self._cancel(handle)
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        self._wire.send(("cancel", handle.id))

    def run(self, request: ChatRequest) -> list[Event]:
        """Submit and wait: every event of the request, in order."""
        return list(self.submit(request).events())

    def _state(self, name: str, default):
        try:
            return self._ask(name, timeout=STATE_TIMEOUT_S)
        except Exception:  # the child is gone or busy past the timeout: the gauges read the default
            return default

    def queue_length(self) -> int:
        return self._state("queue_length", 0)

    @property
    def running(self) -> int:
        return self._state("running", 0)

    @property
    def max_batch(self) -> int:
        return self._info["decoding"]["max_batch"]

    @property
    def kv_cache_usage(self) -> float:
        return self._state("kv_cache_usage", 0.0)

    @property
    def idle(self) -> bool:
        return self._state("idle", True) if self.ready else True

    def memory(self) -> dict[str, int]:
        """The child's memory in use (per GPU, or its resident set: the model's process, not the web server's)."""
        return self._state("memory", {})

    def info(self) -> dict:
        return dict(self._info)

    def decoding(self) -> dict:
        return dict(self._info["decoding"])

    def tokenize(self, prompt, add_special_tokens: bool = True, enable_thinking: bool = True) -> list[int]:
        return self._ask("tokenize", prompt, add_special_tokens, enable_thinking)

    def detokenize(self, ids: list[int]) -> str:
        return self._ask("detokenize", ids)

    def _transcribe(self, audio) -> str:
        return self._ask("transcribe", audio)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._wire.send(("close",)):
            self._receiver.join(timeout=CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._conn.close()

    @property
    def pid(self) -> int | None:
        """The child's process id (the load test and the benchmarks measure its memory and CPU too)."""
        return self._process.pid


__all__ = ["ProcessEngine", "child_main", "portable"]
