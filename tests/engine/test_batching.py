"""Continuous batching: requests decoded together give what each gives alone, token for token, with the same
focus and routing; a cancelled request leaves within one step; a request that finds every slot taken waits and is
then served; the compiled step gives what the eager one gives.

"Alone" is the reference path: ``Generation.run`` through the model's own forward and cache, with the probes on
hooks (the path the probe tests check against eager attention and the routers' outputs).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from autoglm_app.engine.generation import Generation
from autoglm_app.events import Answer, Done, Focus, Queued, Reasoning, Routing, Stats
from tests import tiny_families as tiny
from tests.engine.test_engine import ask, scene, tone
from tests.helpers import make_engine


def solo(engine, request) -> list:
    """The request alone through the model's own forward (no batch, no static cache)."""
    events: list = []
    stats = Generation(engine.rt, engine._validate(request), events.extend, lambda: False).run()
    return events + [stats]


def tokens_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, (Reasoning, Answer)))


def assert_same_answer(batched: list, alone: list, atol: float = 1e-4) -> None:
    assert tokens_of(batched) == tokens_of(alone)
    sb = next(e for e in batched if isinstance(e, Stats))
    sa = next(e for e in alone if isinstance(e, Stats))
    assert (sb.completion_tokens, sb.finish_reason) == (sa.completion_tokens, sa.finish_reason)
    fb, fa = [e for e in batched if isinstance(e, Focus)], [e for e in alone if isinstance(e, Focus)]
    assert len(fb) == len(fa)
    for x, y in zip(fb, fa):
        for mx, my in zip(x.images + x.audios, y.images + y.audios):
            np.testing.assert_allclose(mx, my, atol=atol)
        for mx, my in zip(x.per_layer_images, y.per_layer_images):
            np.testing.assert_allclose(mx, my, atol=atol)
    rb, ra = [e for e in batched if isinstance(e, Routing)], [e for e in alone if isinstance(e, Routing)]
    assert len(rb) == len(ra)
    for x, y in zip(rb, ra):
        assert [(r.layer, r.experts) for r in x.layers] == [(r.layer, r.experts) for r in y.layers]
        np.testing.assert_allclose([r.weights for r in x.layers], [r.weights for r in y.layers], atol=1e-5)
    if rb:  # the running counts as the request ended (events delivered together share their delivery's counts)
        x, y = rb[-1].counts, ra[-1].counts
        for name in ("prefill", "decode", "dropped"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        for got, want in ((x.windows, y.windows), (x.by_phase, y.by_phase), (x.by_modality, y.by_modality)):
            assert got.keys() == want.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], want[key])
        assert x.tokens == y.tokens and x.phase_tokens == y.phase_tokens
        np.testing.assert_array_equal(x.prompt_experts, y.prompt_experts)


def mixed_requests() -> list:
    """Different media, lengths (so requests leave the batch at different steps) and sampling settings."""
    return [
        ask(images=[scene()], temperature=0, max_new_tokens=6, min_new_tokens=6, focus=True, routing=True, session="a"),
        ask("Say something.", temperature=0, max_new_tokens=14, min_new_tokens=14, focus=True, routing=True,
            session="b"),
        ask(images=[scene((30, 30, 220)), scene()], audios=[tone(0.5)], temperature=0, max_new_tokens=10,
            min_new_tokens=10, focus=True, routing=True, session="c"),
        ask(images=[scene()], temperature=0.9, top_p=0.9, seed=7, max_new_tokens=18, min_new_tokens=18,
            focus=False, routing=True, session="d"),
        ask("Who are you?", temperature=0, max_new_tokens=9, focus=False, routing=False, enable_thinking=False,
            session="e"),
    ]


def widest_step(engine) -> list[int]:
    """Record how many requests each decode step carried."""
    sizes: list[int] = []
    real = engine.decoder.step

    def step(gens):
        sizes.append(len(gens))
        return real(gens)

    engine.decoder.step = step
    return sizes


def assert_batched_equals_alone(engine, requests) -> None:
    alone = [solo(engine, r) for r in requests]
    for b, a in zip(run_together(engine, requests), alone):
        assert_same_answer(b, a)


def run_together(engine, requests) -> list[list]:
    handles = [engine.submit(r) for r in requests]
    return [list(h.events(timeout=120)) for h in handles]


@pytest.fixture(scope="module")
def demo_engine():
    from autoglm_app.config import DEMO_MODEL
    from autoglm_app.loading.checkpoints import load_model

    loaded = load_model(str(DEMO_MODEL), quantize="fp32")
    engine = make_engine(loaded.model, loaded.processor, max_batch=4)
    yield engine
    engine.close()


@pytest.mark.parametrize("which", ["demo", "small"])
def test_requests_decoded_together_equal_each_alone(which, demo_engine, small):
    engine = demo_engine if which == "demo" else make_engine(*small, max_batch=4)
    try:
        assert engine.decoding()["batched"] and engine.max_batch == 4
        requests = mixed_requests()
        alone = [solo(engine, r) for r in requests]
        sizes = widest_step(engine)
        together = run_together(engine, requests)
        assert max(sizes) == 4  # four shared a step; the fifth waited for a slot, then joined
        for b, a in zip(together, alone):
            assert isinstance(b[-1], Done)
            assert_same_answer(b, a)
    finally:
        if engine is not demo_engine:
            engine.close()


def test_a_cancelled_request_leaves_within_one_step_and_the_others_go_on(demo_engine):
    requests = [ask(images=[scene()], temperature=0, max_new_tokens=40, min_new_tokens=40, focus=True, routing=True,
                    session=s) for s in ("x", "y", "z")]
    requests[1] = ask("Count to ten.", temperature=0, max_new_tokens=40, min_new_tokens=40, session="y")
    alone = [solo(demo_engine, r) for r in (requests[0], requests[2])]
    handles = [demo_engine.submit(r) for r in requests]
    after_cancel: list = []
    cancelled = threading.Event()

    def read_and_cancel():
        seen = 0
        for e in handles[1].events(timeout=60):
            if cancelled.is_set():
                after_cancel.append(e)
            elif isinstance(e, (Reasoning, Answer)):
                seen += 1
                if seen == 5:
                    handles[1].cancel()
                    cancelled.set()

    reader = threading.Thread(target=read_and_cancel)
    reader.start()
    others = [list(handles[i].events(timeout=120)) for i in (0, 2)]
    reader.join(timeout=60)
    # the step in flight when the flag went up may still deliver its token; then the request is over
    assert sum(isinstance(e, (Reasoning, Answer)) for e in after_cancel) <= 1
    assert isinstance(after_cancel[-1], Done) and after_cancel[-1].finish_reason == "cancelled"
    for b, a in zip(others, alone):
        assert_same_answer(b, a)
    assert demo_engine.idle


def test_a_request_that_finds_every_slot_taken_waits_then_is_served(small):
    engine = make_engine(*small, max_batch=2)
    try:
        sizes = widest_step(engine)
        requests = [ask(f"Question {i}?", temperature=0, max_new_tokens=12, min_new_tokens=12, session=f"s{i}")
                    for i in range(3)]
        results = run_together(engine, requests)
        assert max(sizes) == 2
        third = results[2]
        waits = [e.position for e in third if isinstance(e, Queued)]
        assert waits[0] >= 1 and waits[-1] == 0  # it waited behind the batch, then ran
        assert all(isinstance(r[-1], Done) and r[-1].finish_reason == "length" for r in results)
        assert_same_answer(third, solo(engine, requests[2]))
    finally:
        engine.close()


def test_kv_slots_are_accounted(small):
    engine = make_engine(*small, max_batch=3, context_limit=256)
    try:
        info = engine.info()["decoding"]
        cfg = small[0].config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 keys + values
        assert info["kv_bytes"] == 3 * 256 * per_token == engine.decoder.kv.nbytes
        assert engine.kv_cache_usage == 0.0
    finally:
        engine.close()


def test_the_compiled_step_equals_the_eager_one(small, caplog):
    """torch.compile of the step (the forms it times at warm-up), then the same requests give the same answers,
    focus and routing as the reference path; the warm-up time is reported."""
    with caplog.at_level(logging.INFO, logger="autoglm_app.engine.decoding"):
        engine = make_engine(*small, max_batch=3, compile="on")
    try:
        info = engine.info()["decoding"]
        assert info["compile_warmup_s"] > 0 and {"eager", "compiled, one graph"} <= set(info["step_ms"])
        assert "decode step:" in caplog.text
        engine.decoder.use("compiled, one graph")  # whichever was faster on this machine (a loaded CI runner)
        assert_batched_equals_alone(engine, mixed_requests()[:3])
        engine.decoder.pad_one = True  # a lone row run as two (what warm-up keeps where it is faster): the same
        assert_batched_equals_alone(engine, mixed_requests()[:3])
    finally:
        engine.close()


def test_one_slot_run_as_two_rows_gives_the_answers_alone(small, monkeypatch):
    """With one slot and a step that may be compiled on the CPU the cache holds a spare slot, so a lone row can run
    with its copy beside it (``StaticDecoder.pad_one``); its answers, focus and routes are the request's alone
    (eager here: torch.compile refused, the padding is the same in every form)."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not here")))
    engine = make_engine(*small, max_batch=1, compile="on")
    try:
        assert engine.max_batch == 1 and engine.decoder.kv.slots == 2 and not engine.decoder.pad_one
        engine.decoder.pad_one = True
        for request in mixed_requests()[:2]:
            assert_same_answer(engine.run(request), solo(engine, request))
    finally:
        engine.close()


def test_the_layer_group_compiled_step_equals_the_eager_one(small, monkeypatch):
    """The form for models whose experts do not fit a cache: runs of layers, each one compiled graph (no module
    in its arguments) with each row's chosen experts read inside it; forced here by lowering the threshold."""
    from autoglm_app.engine import decoding

    monkeypatch.setattr(decoding, "DENSE_EXPERTS_BYTES", 0)
    engine = make_engine(*small, max_batch=3, compile="on")
    try:
        assert "compiled in layer groups, chosen experts" in engine.info()["decoding"]["step_ms"]
        engine.decoder.use("compiled in layer groups, chosen experts")  # whichever was faster
        assert_batched_equals_alone(engine, mixed_requests()[:3])
    finally:
        engine.close()


def test_a_step_that_cannot_be_compiled_decodes_eagerly_and_says_why(small, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.WARNING, logger="autoglm_app.engine.decoding"):
        engine = make_engine(*small, max_batch=2, compile="on")
    try:
        assert "could not be compiled (RuntimeError: no C++ compiler here); decoding eagerly" in caplog.text
        assert not engine.info()["decoding"]["compiled"]
        request = ask(temperature=0, max_new_tokens=5, session="q")
        assert_same_answer(engine.run(request), solo(engine, request))
    finally:
        engine.close()
