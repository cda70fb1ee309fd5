"""How far the start-up has got: one thread-safe object the loaders update and the loading page reads.

``LoadProgress`` holds a stage ("reading the config", "loading weights", ...), a count within it
(``done`` of ``total`` ``unit``), and the outcome: ``loading``, then ``ready`` or ``failed`` with the
message. ``snapshot()`` is the JSON that ``GET /health`` answers while the model loads.

``reporting(progress)`` makes it the current one of this thread: ``load_model`` and
``server.load_engine`` report to ``current_progress()`` when they are not given one, so their
signatures stay what they were. ``counting_weights(progress)`` counts the weights transformers' ``from_pretrained`` materialises:
transformers 5 loads every checkpoint tensor (or group of tensors that one converter merges) in one
loop, ``core_model_loading.convert_and_load_state_dict_in_model``, iterated through that module's
``tqdm``. Within the block that ``tqdm`` is wrapped so each item the loop finishes counts one, on
the thread that runs the load (other threads' loads are not counted). On a transformers without that
loop nothing is counted and the stage alone is reported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

log = logging.getLogger(__name__)

__all__ = ["LoadProgress", "counting_weights", "current_progress", "reporting"]


class LoadProgress:
    """The start-up's stage and count; every method is safe to call from any thread."""

    def __init__(self, model: str = ""):
        self.model = model
        self._lock = threading.Lock()
        self._stage = "starting"
        self._done = 0
        self._total = 0
        self._unit = ""
        self._status = "loading"
        self._error: str | None = None
        self._started = time.monotonic()
        self._finished: float | None = None

    # ------------------------------------------------------------------ the loaders' side
    def stage(self, name: str, total: int = 0, unit: str = "") -> None:
        """A new stage; its count starts at 0 of ``total`` (0: not counted)."""
        with self._lock:
            self._stage, self._done, self._total, self._unit = name, 0, int(total), unit
        log.info("start-up: %s", name)

    def expect(self, n: int, unit: str | None = None) -> None:
        """``n`` more items in this stage (a stage made of several loops adds each loop's length)."""
        with self._lock:
            self._total += int(n)
            if unit is not None:
                self._unit = unit

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done = min(self._done + int(n), self._total) if self._total else self._done + int(n)

    def ready(self) -> None:
        with self._lock:
            self._status, self._stage, self._finished = "ready", "ready", time.monotonic()

    def fail(self, message: str) -> None:
        with self._lock:
            self._status, self._error, self._finished = "failed", message, time.monotonic()

    # ------------------------------------------------------------------ the readers' side
    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    def snapshot(self) -> dict:
        """{"status", "model", "progress": {"stage", "done", "total", "unit"}, "elapsed_s"[, "error"]}."""
        with self._lock:
            end = self._finished if self._finished is not None else time.monotonic()
            out = {"status": self._status, "model": self.model,
                   "progress": {"stage": self._stage, "done": self._done, "total": self._total, "unit": self._unit},
                   "elapsed_s": round(end - self._started, 1)}
            if self._error is not None:
                out["error"] = self._error
            return out


_local = threading.local()  # .current: the reporting() progress; .counting: the counting_weights() one


@contextlib.contextmanager
def reporting(progress: LoadProgress):
    """Within this block, ``current_progress()`` on this thread is ``progress``."""
    previous = getattr(_local, "current", None)
    _local.current = progress
    try:
        yield progress
    finally:
        _local.current = previous


def current_progress(model: str = "") -> LoadProgress:
    """The progress a ``reporting`` block set on this thread, or a fresh one nobody reads."""
    return getattr(_local, "current", None) or LoadProgress(model)


# ----------------------------------------------------------------------------- transformers' weight loop

_patch_lock = threading.Lock()
_patch = {"users": 0, "original": None}


def _counted(bar, progress: LoadProgress):
    """Iterate transformers' bar; an item counts once the loop asks for the next one (it is then loaded)."""
    for item in bar:
        yield item
        progress.advance()


def _counting_tqdm(iterable=None, *args, **kwargs):
    bar = _patch["original"](iterable, *args, **kwargs)
    progress = getattr(_local, "counting", None)
    if progress is None or iterable is None or not hasattr(iterable, "__len__"):
        return bar
    progress.expect(len(iterable), "tensors")
    return _counted(bar, progress)


@contextlib.contextmanager
def counting_weights(progress: LoadProgress | None):
    """Within this block, the weights a ``from_pretrained`` on this thread loads count in ``progress``."""
    if progress is None:
        yield
        return
    try:
        import transformers.core_model_loading as cml

        cml.tqdm  # noqa: B018  (the loop's progress bar: the hook)
    except (ImportError, AttributeError):  # pragma: no cover - another transformers version
        log.info("this transformers has no weight-loading loop to count: the start-up reports stages only")
        yield
        return
    with _patch_lock:
        if _patch["users"] == 0:
            _patch["original"] = cml.tqdm
            cml.tqdm = _counting_tqdm
        _patch["users"] += 1
    previous = getattr(_local, "counting", None)
    _local.counting = progress
    try:
        yield
    finally:
        _local.counting = previous
        with _patch_lock:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                cml.tqdm = _patch["original"]  # (kept in _patch: a loop that looked it up just now still works)
