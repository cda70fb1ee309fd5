"""One request's event stream: the producer ``put``s events, one consumer reads them.

A thread reads with ``events()`` (the page, tests); an asyncio task reads with ``aevents()``
(the API), which the producer wakes through the consumer's loop, so no thread sits between
the engine and the route and a burst of events (a token's text, focus and routing) costs one
wake-up. Both iterators end after ``Done`` or ``Error``; leaving either one early cancels the
request, and ``cancel()`` stops it within one token: from then on the reader gets no token's events, only
the end (``Stats``, ``Done``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

from ..events import Answer, ChatRequest, Done, Error, Event, Focus, Logprobs, Reasoning, Routing

TERMINAL = (Done, Error)
# what a token brings; once the request is cancelled the reader is given none of these any more, even those the
# worker produced before the flag and delivered together with the ones already read
TOKEN_EVENTS = (Reasoning, Answer, Focus, Routing, Logprobs)
log = logging.getLogger(__name__)


def observing(observers: list[Callable[[ChatRequest, Event], None]]) -> Callable[[ChatRequest, Event], None] | None:
    """The ``observe`` hook for a handle: each observer in turn (metrics); a failing one is logged, never
    raised, so telemetry cannot fail a request. None when there is nobody to tell."""
    if not observers:
        return None

    def observe(request: ChatRequest, event: Event) -> None:
        for observer in observers:
            try:
                observer(request, event)
            except Exception:
                log.exception("an engine observer failed on %s", type(event).__name__)

    return observe


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class LoopWaker:
    """Wakes one event loop once for every reader on it that has events: the worker delivering to eight
    streams in one step writes the loop's wake-up pipe once, not eight times (measured: those writes were
    11 % of the worker's time with eight API streams in flight)."""

    _for: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker]" = weakref.WeakKeyDictionary()
    _made = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[asyncio.Future] = []
        self.lock = threading.Lock()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopWaker":
        with cls._made:
            waker = cls._for.get(loop)
            if waker is None:
                waker = cls._for[loop] = cls(loop)
            return waker

    def wake(self, future: asyncio.Future) -> None:
        """Resolve ``future`` on its loop soon (any thread); RuntimeError if the loop is closed."""
        with self.lock:
            self.pending.append(future)
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            with self.lock:
                self.scheduled = False
                self.pending.clear()
            raise

    def _run(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for future in pending:
            _resolve(future)


class RequestHandle:
    """One request's event stream; ``cancel()`` stops it within one token."""

    def __init__(self, request: ChatRequest, request_id: int):
        self.request = request
        self.id = request_id
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._wake: Callable[[], None] | None = None  # set while an asyncio consumer waits for an event
        self.submitted = time.perf_counter()
        self.last_position: int | None = None
        self.arrival_tick: float = -1.0  # set by Engine.submit (see Engine._order)
        self._on_cancel = None  # set by Engine.submit while the request waits
        self.observe: Callable[[ChatRequest, Event], None] | None = None  # set by the engine: metrics

    def put(self, event: Event) -> None:
        """Add an event (from any thread) and wake a waiting asyncio consumer."""
        self._events.put(event)
        if self.observe is not None:
            self.observe(self.request, event)
        self._wake_consumer()

    def put_all(self, events: list[Event]) -> None:
        """Add several events as one delivery: a token's text, focus and routing wake the consumer once, not
        three times (measured: each wake-up of the reading thread cost the worker about 0.1 ms of a 1 ms step
        on two cores, through the interpreter lock)."""
        if not events:
            return
        self._events.put(tuple(events))
        if self.observe is not None:
            for event in events:
                self.observe(self.request, event)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        wake, self._wake = self._wake, None  # one wake-up per wait, however many events arrive
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def cancel(self) -> None:
        self._cancel.set()
        if self._on_cancel is not None:  # still queued: leave the queue now, not when the worker gets to it
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _readable(self, item) -> Iterator[Event]:
        """The events of one delivery (one event, or a tuple of them) the reader is given: after a cancel,
        none of a token's."""
        for event in item if type(item) is tuple else (item,):
            if not (self._cancel.is_set() and isinstance(event, TOKEN_EVENTS)):
                yield event

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events until Done or Error (blocking). Closing the iterator early cancels the request."""
        finished = False
        try:
            while True:
                item = self._events.get(timeout=timeout)
                for event in self._readable(item):
                    yield event
                    if isinstance(event, TERMINAL):
                        finished = True
                        return
        finally:
            if not finished:
                self.cancel()

    async def aevents(self) -> AsyncIterator[Event]:
        """The same events for an asyncio consumer, without a thread: ``put`` wakes this task's loop.
        Closing the iterator early (or cancelling the task) cancels the request."""
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    await self._next_put(loop)
                    continue
                for event in self._readable(item):
                    yield event
                    if isinstance(event, TERMINAL):
                        finished = True
                        return
        finally:
            self._wake = None
            if not finished:
                self.cancel()

    async def _next_put(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until ``put`` has been called (returns at once if an event is already there)."""
        woken = loop.create_future()
        waker = LoopWaker.of(loop)
        self._wake = lambda: waker.wake(woken)
        if self._events.empty():  # checked after arming: an event put just before is not missed
            await woken
        self._wake = None
