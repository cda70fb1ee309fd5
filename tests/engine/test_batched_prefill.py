"""Batched prefill: requests admitted between the same two steps share one forward of the model (left-padded), and
each gets what it gets alone: the same tokens, focus (its first token's included) and routing counts (the prompt's
own routes and the choices its capacity dropped); the padding claims no expert capacity; a prompt that cannot go in
the batch (audio) is prefilled alone beside it; a batched forward that fails is retried one request at a time."""

from __future__ import annotations

import threading

import pytest
import torch

from autoglm_app.engine import worker as worker_module
from autoglm_app.engine.prefill import pad_left
from autoglm_app.modeling.small import build_small
from tests.engine.test_batching import assert_same_answer, solo
from tests.engine.test_engine import ask, scene, tone
from tests.helpers import make_engine


def admitted_together(engine, requests) -> tuple[list[list], int]:
    """Submit ``requests`` while the worker is held in a ``call`` job, so that it takes them all between the same two
    steps -> (each request's events, prefill forwards it ran for them)."""
    held, release = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(30)

    job = threading.Thread(target=engine.call, args=(hold,))
    job.start()
    assert held.wait(30)
    before = engine.prefill_forwards
    handles = [engine.submit(r) for r in requests]
    release.set()
    job.join(30)
    events = [list(h.events(timeout=120)) for h in handles]
    return events, engine.prefill_forwards - before


def prompts() -> list:
    """Different lengths (so rows are padded), one or two images or none, greedy and sampled, probes on."""
    return [
        ask(images=[scene()], temperature=0, max_new_tokens=6, min_new_tokens=6, focus=True, routing=True,
            session="a"),
        ask("Describe both pictures in a few words, please.", images=[scene((30, 30, 220)), scene()], temperature=0,
            max_new_tokens=9, min_new_tokens=9, focus=True, routing=True, session="b"),
        ask("Say something.", temperature=0, max_new_tokens=7, min_new_tokens=7, focus=False, routing=True,
            session="c"),
        ask("Who are you, and what can you do?", temperature=0.9, top_p=0.9, seed=3, max_new_tokens=8,
            min_new_tokens=8, routing=True, focus=False, session="d"),
    ]


@pytest.fixture(scope="module")
def tight(small):
    """The small model with a capacity that drops choices in a prompt (so per-sequence capacity is exercised)."""
    model, processor = build_small(0, capacity_factor=0.6)
    model.load_state_dict(small[0].state_dict())
    return model.eval(), processor


@pytest.mark.parametrize("which", ["small", "tight"])
def test_requests_admitted_together_share_a_prefill_and_equal_each_alone(which, small, tight):
    engine = make_engine(*(small if which == "small" else tight), max_batch=4)
    try:
        requests = prompts()
        alone = [solo(engine, r) for r in requests]
        together, forwards = admitted_together(engine, requests)
        assert forwards == 2  # the two prompts with images in one forward, the two without in another
        for b, a in zip(together, alone):
            assert_same_answer(b, a)
        if which == "tight":  # capacity did drop prompt choices, and each request counted only its own
            dropped = [next(e for e in reversed(r) if getattr(e, "counts", None) is not None).counts.dropped
                       for r in together]
            assert sum(int(d.sum()) for d in dropped) > 0
    finally:
        engine.close()


def test_a_prompt_with_audio_is_prefilled_alone_beside_the_batch(small):
    engine = make_engine(*small, max_batch=3)
    try:
        requests = prompts()[:2] + [ask("Listen.", audios=[tone(0.4)], temperature=0, max_new_tokens=5,
                                        min_new_tokens=5, focus=True, routing=True, session="e")]
        alone = [solo(engine, r) for r in requests]
        together, forwards = admitted_together(engine, requests)
        assert forwards == 2
        for b, a in zip(together, alone):
            assert_same_answer(b, a)
    finally:
        engine.close()


def test_a_batched_prefill_that_fails_is_retried_one_request_at_a_time(small, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("too big together")

    monkeypatch.setattr(worker_module, "prefill_batch", fail)
    engine = make_engine(*small, max_batch=4)
    try:
        requests = prompts()
        alone = [solo(engine, r) for r in requests]
        together, forwards = admitted_together(engine, requests)
        assert forwards == 2  # (counted as tried)
        for b, a in zip(together, alone):
            assert_same_answer(b, a)
    finally:
        engine.close()


def test_padding_claims_no_capacity_and_a_row_is_routed_as_it_is_alone(tight):
    """The model's own forward on a left-padded batch: each row's newest logits and every real token's routes
    (kept choices included, under a capacity that drops some) equal that row's forward alone."""
    model, processor = tight
    rows = [processor.apply_chat_template([{"role": "user", "content": t}]) for t in
            ("Hello there, how are you today?", "Hi.")]
    inputs = [processor(text) for text in rows]
    inputs = [{"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]} for x in inputs]
    routes: list = []
    router = model.moe_blocks()[0][1].router
    handle = router.register_forward_hook(lambda m, a, out: routes.append(out))
    try:
        with torch.no_grad():
            alone = [model(**x, logits_to_keep=1).logits[0, -1] for x in inputs]
            alone_routes = routes[:]
            routes.clear()
            batch = pad_left(inputs, model.config.pad_token_id)
            together = model(**batch, logits_to_keep=1).logits[:, -1]
    finally:
        handle.remove()
    assert not all(bool(r[3].all()) for r in alone_routes)  # something was dropped alone
    T = batch["input_ids"].shape[1]
    _, experts, _, kept = routes[0]
    for i, x in enumerate(inputs):
        n = x["input_ids"].shape[1]
        torch.testing.assert_close(together[i], alone[i], atol=1e-4, rtol=1e-4)
        own = slice(i * T + T - n, (i + 1) * T)
        assert torch.equal(experts[own], alone_routes[i][1]) and torch.equal(kept[own], alone_routes[i][3])
        assert not kept[i * T : i * T + T - n].any()  # the padding was given no expert
