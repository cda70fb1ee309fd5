"""The engine in a child process (``--engine-process on``): the same events, errors, cancellation and calls as
the in-process engine, the load's progress forwarded, and a child that dies ends its requests with an Error."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from autoglm_app.config import Settings
from autoglm_app.engine.process import ProcessEngine, portable
from autoglm_app.events import (
    Answer,
    BadRequest,
    ChatRequest,
    Done,
    EngineBusy,
    Error,
    Focus,
    Message,
    Options,
    Reasoning,
    Routing,
    Stats,
)
from autoglm_app.loading.progress import LoadProgress
from autoglm_app.server import load_engine

SETTINGS = Settings(model="small", engine_process="on", compile="off", cpu_threads=1)


class Recorded(LoadProgress):
    """A LoadProgress that keeps the stage names it hears."""

    def __init__(self):
        super().__init__("small")
        self.stages: list[str] = []

    def stage(self, name: str, total: int = 0, unit: str = "") -> None:
        super().stage(name, total, unit)
        self.stages.append(name)


def scene() -> Image.Image:
    img = Image.new("RGB", (96, 96), (235, 235, 230))
    img.paste((220, 30, 30), (10, 10, 40, 40))
    return img


def ask(tokens: int = 12, **opts) -> ChatRequest:
    o = Options(temperature=0, seed=0, max_new_tokens=tokens, **opts)
    return ChatRequest([Message("user", "What color is the square?", [scene()])], o, session_id="p")


@pytest.fixture(scope="module")
def loaded():
    progress = Recorded()
    eng = load_engine(SETTINGS, progress)
    yield eng, progress
    eng.close()


@pytest.fixture(scope="module")
def proc(loaded):
    return loaded[0]


def comparable(events) -> list:
    """Each event as plain values: text, focus grids, experts and weights, the finish; Stats by its counts."""
    out = []
    for e in events:
        if isinstance(e, (Answer, Reasoning)):
            out.append((type(e).__name__, e.text))
        elif isinstance(e, Focus):
            out.append(("focus", e.index, [np.asarray(g, dtype=np.float64) for g in e.images]))
        elif isinstance(e, Routing):
            ids, experts, weights = e.arrays()
            out.append(("routing", e.index, list(ids), np.asarray(experts), np.asarray(weights, dtype=np.float64)))
        elif isinstance(e, Stats):
            out.append(("stats", e.prompt_tokens, e.completion_tokens, e.reasoning_tokens, e.answer_tokens))
        elif isinstance(e, Done):
            out.append(("done", e.finish_reason))
        elif isinstance(e, Error):
            out.append(("error", e.kind))
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        assert x[0] == y[0] and len(x) == len(y), (x, y)
        for u, v in zip(x[1:], y[1:]):
            if isinstance(u, list) and u and isinstance(u[0], np.ndarray):
                assert all(np.allclose(p, q, atol=1e-6) for p, q in zip(u, v))
            elif isinstance(u, np.ndarray):
                np.testing.assert_allclose(u, v, atol=1e-6)
            else:
                assert u == v, (x, y)


def test_load_reports_the_childs_progress_and_pid(loaded):
    eng, progress = loaded
    assert isinstance(eng, ProcessEngine) and eng.ready
    assert eng.pid != os.getpid()
    assert "starting the engine process" in progress.stages
    assert "building the small random model" in progress.stages  # a stage of the child's loader
    assert eng.info()["model_id"] == "autoglm-small-random"
    assert eng.decoding()["max_batch"] == eng.max_batch >= 1


def test_events_equal_the_in_process_engine(proc, engine):
    """The same greedy request with focus and routing: the same text, maps, experts and counts either way."""
    request = ask(tokens=12, focus=True, routing=True)
    here = comparable(engine.run(ask(tokens=12, focus=True, routing=True)))
    there = comparable(proc.run(request))
    assert any(e[0] == "focus" for e in there) and any(e[0] == "routing" for e in there)
    assert_same(here, there)


def test_bad_request_is_raised_in_the_parent_and_the_engine_keeps_serving(proc):
    empty = Image.new("RGB", (96, 96))
    empty_request = ChatRequest([Message("user", "hi", [empty.crop((0, 0, 0, 0))])], Options(max_new_tokens=4))
    with pytest.raises(BadRequest, match="empty"):
        proc.submit(empty_request)
    assert isinstance(proc.run(ask(tokens=4))[-1], Done)


def test_calls_answer_from_the_child(proc, engine):
    ids = proc.tokenize("What color is the square?", add_special_tokens=False)
    assert ids == engine.tokenize("What color is the square?", add_special_tokens=False)
    assert proc.detokenize(ids) == engine.detokenize(ids)
    assert proc.queue_length() == 0 and proc.running == 0 and proc.idle
    assert 0.0 <= proc.kv_cache_usage <= 1.0


def test_cancel_ends_a_running_request_and_the_next_one_runs(proc):
    handle = proc.submit(ask(tokens=400, min_new_tokens=400))
    events = handle.events(timeout=60)
    for e in events:
        if isinstance(e, (Answer, Reasoning)):
            break
    handle.cancel()
    rest = list(events)
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"
    stats = [e for e in rest if isinstance(e, Stats)]
    assert stats and stats[-1].completion_tokens < 300  # it stopped long before its 400 tokens
    assert isinstance(proc.run(ask(tokens=4))[-1], Done)


def test_cancel_before_the_child_answers_the_submit(proc):
    handle = proc.submit(ask(tokens=400, min_new_tokens=400))
    handle.cancel()
    events = list(handle.events(timeout=60))
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert all(e.completion_tokens < 300 for e in events if isinstance(e, Stats))
    assert isinstance(proc.run(ask(tokens=4))[-1], Done)
    assert proc.running == 0


def test_a_killed_child_ends_open_requests_with_an_error_and_refuses_new_ones():
    eng = load_engine(SETTINGS)
    try:
        handle = eng.submit(ask(tokens=2000, min_new_tokens=2000))
        events = handle.events(timeout=60)
        next(e for e in events if isinstance(e, (Answer, Reasoning)))
        os.kill(eng.pid, signal.SIGKILL)
        rest = list(events)
        assert isinstance(rest[-1], Error) and "ended unexpectedly" in rest[-1].message
        deadline = time.monotonic() + 10
        while eng.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not eng.ready
        with pytest.raises(EngineBusy, match="restart the server"):
            eng.submit(ask(tokens=4))
        assert eng.queue_length() == 0  # the gauges read their defaults
    finally:
        eng.close()


def test_a_load_that_fails_in_the_child_raises_in_the_parent(tmp_path):
    with pytest.raises((SystemExit, RuntimeError, OSError, ValueError)) as info:
        load_engine(replace(SETTINGS, model=str(tmp_path / "no-such-model")))
    assert "no-such-model" in str(info.value)


def test_compare_mode_asks_for_the_in_process_engine():
    with pytest.raises(SystemExit, match="--engine-process off"):
        load_engine(replace(SETTINGS, compare_model="small"))


def test_errors_that_cannot_be_pickled_become_runtime_errors():
    class Local(Exception):  # a class pickle cannot find by name
        pass

    assert isinstance(portable(BadRequest("x")), BadRequest)
    busy = portable(EngineBusy("full", retry_after=7.0))
    assert isinstance(busy, EngineBusy) and busy.retry_after == 7.0
    got = portable(Local("boom"))
    assert isinstance(got, RuntimeError) and "Local: boom" in str(got)
