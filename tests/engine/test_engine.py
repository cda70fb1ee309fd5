"""The engine's event stream on a small random AutoGLM model, on the CPU."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_app.engine import generation, sampling
from autoglm_app.events import (
    Answer,
    Audio,
    BadRequest,
    ChatRequest,
    Done,
    EngineBusy,
    Error,
    Focus,
    Message,
    Notice,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
)
from autoglm_app.families import AUTOGLM
from tests.helpers import make_engine


def scene(color=(220, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (96, 96), (235, 235, 230))
    img.paste(color, (10, 10, 40, 40))
    return img


def tone(seconds=1.0, rate=16000) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    return Audio((np.sin(2 * np.pi * 440 * t) * 0.3).astype(np.float32), rate)


def ask(text="What color is the square?", images=None, audios=None, session="s", **opts) -> ChatRequest:
    opts.setdefault("max_new_tokens", 8)
    opts.setdefault("seed", 0)
    return ChatRequest([Message("user", text, images or [], audios or [])], Options(**opts), session_id=session)


def texts(events) -> tuple[str, str]:
    return (
        "".join(e.text for e in events if isinstance(e, Reasoning)),
        "".join(e.text for e in events if isinstance(e, Answer)),
    )


def scripted(monkeypatch, processor, text: str):
    """Make the loop choose the tokens of ``text`` (then end-of-text) instead of sampling."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    it = iter(ids)
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: next(it))


# ----------------------------------------------------------------------------- event stream


def test_event_order(engine):
    events = engine.run(ask(images=[scene()], audios=[tone()]))
    kinds = [type(e).__name__ for e in events]
    assert isinstance(events[0], Queued)
    assert isinstance(events[-1], Done) and isinstance(events[-2], Stats)
    body = kinds[1:-2]
    assert set(body) <= {"Reasoning", "Answer", "Focus", "Routing", "Queued", "Notice"}
    assert body.count("Focus") == events[-2].completion_tokens == body.count("Routing")
    stats = events[-2]
    assert stats.prompt_tokens > 16 + 25  # text + 4x4 patches + 1 s of audio frames
    assert stats.ttft_s > 0 and stats.attention == "sdpa+probe"


def test_think_split_through_the_engine(engine, small, monkeypatch):
    scripted(monkeypatch, small[1], "<think>I see a red square.</think>The square is red.")
    events = engine.run(ask(max_new_tokens=64))
    assert texts(events) == ("I see a red square.", "The square is red.")
    stats = events[-2]
    assert stats.reasoning_tokens > 0 and stats.answer_tokens > 0 and stats.think_s is not None
    assert events[-1].finish_reason == "stop"


def test_budget_running_out_inside_thinking(engine, small, monkeypatch):
    scripted(monkeypatch, small[1], "<think>a long long long line of thought</think>Red.")
    events = engine.run(ask(max_new_tokens=5))
    reasoning, answer = texts(events)
    assert reasoning and answer == ""
    assert events[-1].finish_reason == "length"


def test_thinking_off_goes_through_the_template(engine, small, monkeypatch):
    prompt = AUTOGLM.prepare(small[1], ask().messages, enable_thinking=False).inputs["input_ids"][0]
    assert small[1].tokenizer.decode(prompt).endswith("<think></think>")
    scripted(monkeypatch, small[1], "Red.")
    assert texts(engine.run(ask(enable_thinking=False))) == ("", "Red.")


# ----------------------------------------------------------------------------- focus


def probe_rows_by_hand(model, processor, request) -> tuple[list, list]:
    """Reference: full eager attention rows of the last prompt position, captured per layer."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    prep = AUTOGLM.prepare(processor, request.messages, True)
    rows = {}

    def capture(layer, q, k, mask, probs, n_mem):
        rows[layer] = probs[0, :, -1].mean(0)  # head mean, all keys

    for layer in eager.model.layers:
        layer.self_attn.focus_probe = capture
    with torch.inference_mode():
        eager(**prep.inputs)
    stacked = torch.stack([rows[i] for i in sorted(rows)])  # (layers, keys)
    return stacked, prep.image_spans


def test_focus_maps_match_eager_attention_and_sum_to_image_mass(engine, small):
    model, processor = small
    request = ask(images=[scene(), scene((30, 30, 220))], temperature=0, max_new_tokens=3)
    events = engine.run(request)
    focus = [e for e in events if isinstance(e, Focus)]
    assert len(focus) == 3
    first = focus[0]
    rows, cols = processor.grid
    assert [m.shape for m in first.images] == [(rows, cols), (rows, cols)]
    assert all((m >= 0).all() for f in focus for m in f.images)

    reference, spans = probe_rows_by_hand(model, processor, request)
    for i, span in enumerate(spans):
        keys = reference[:, span.start : span.start + span.rows * span.cols]
        expected = keys.mean(0).reshape(span.rows, span.cols).numpy()
        np.testing.assert_allclose(first.images[i], expected, atol=1e-4)
        # the map holds exactly the attention mass the token paid to that image
        assert abs(first.images[i].sum() - float(keys.sum(1).mean())) < 1e-4


def test_focus_probe_equals_eager_mode_of_the_engine(small):
    model, processor = small
    eager_model = copy.deepcopy(model)
    eager_model.config._attn_implementation = "eager"
    request = ask(images=[scene()], audios=[tone(0.5)], temperature=0, max_new_tokens=4)
    fast = make_engine(model, processor)
    slow = make_engine(eager_model, processor)
    try:
        a = [e for e in fast.run(request) if isinstance(e, Focus)]
        b = [e for e in slow.run(request) if isinstance(e, Focus)]
        stats_b = slow.run(request)[-2]
    finally:
        fast.close()
        slow.close()
    assert stats_b.attention == "eager"
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b):
        np.testing.assert_allclose(fa.images[0], fb.images[0], atol=1e-4)
        np.testing.assert_allclose(fa.audios[0], fb.audios[0], atol=1e-4)
        assert fa.audios[0].shape == (processor.audio_frames(8000),)


def test_focus_aggregation_rules(engine):
    mean = [e for e in engine.run(ask(images=[scene()], temperature=0, max_new_tokens=2)) if isinstance(e, Focus)]
    mx = [e for e in engine.run(ask(images=[scene()], temperature=0, max_new_tokens=2, focus_aggregation="max"))
          if isinstance(e, Focus)]
    one = [e for e in engine.run(ask(images=[scene()], temperature=0, max_new_tokens=2, focus_layers=(1, 2)))
           if isinstance(e, Focus)]
    per_layer = mean[0].per_layer_images[0]
    np.testing.assert_allclose(mean[0].images[0], per_layer.mean(0), atol=1e-6)
    np.testing.assert_allclose(mx[0].images[0], per_layer.max(0), atol=1e-6)
    np.testing.assert_allclose(one[0].images[0], per_layer[1], atol=1e-6)
    bad = engine.run(ask(images=[scene()], focus_layers=(0, 9)))
    assert isinstance(bad[-1], Error) and "outside" in bad[-1].message


# ----------------------------------------------------------------------------- routing


def test_routing_names_top_k_experts_and_load_adds_up(engine, small):
    model = small[0]
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    events = engine.run(ask(images=[scene()], audios=[tone(0.5)], max_new_tokens=6))
    routes = [e for e in events if isinstance(e, Routing)]
    assert len(routes) == 6
    for r in routes:
        assert [lr.layer for lr in r.layers] == model.config.moe_layers
        for lr in r.layers:
            assert len(lr.experts) == k == len(set(lr.experts))
            assert all(0 <= e < E for e in lr.experts)
            assert abs(sum(lr.weights) - 1) < 1e-3
    load = routes[-1].load
    routed = load["tokens"]["prefill"] + load["tokens"]["decode"]
    stats = events[-2]
    assert load["tokens"]["prefill"] == stats.prompt_tokens
    assert load["tokens"]["decode"] == len(routes) - 1
    for layer_total, dropped in zip(load["total"], load["dropped"]):
        assert sum(layer_total) + dropped == k * routed
    by_mod = load["by_modality"]
    for i in range(len(load["layers"])):
        assert sum(by_mod["image"][i]) == k * 16  # 4x4 patches, all routed in prefill
        assert sum(by_mod["text"][i]) + sum(by_mod["image"][i]) + sum(by_mod["audio"][i]) == sum(load["total"][i])
    assert all(0 <= c for c in load["cv"]) and all(0 <= h <= 1 for h in load["entropy"])


# ----------------------------------------------------------------------------- sampling and inputs


def test_same_seed_same_text_and_other_seed_differs(engine):
    a = texts(engine.run(ask(temperature=1.0, seed=7, max_new_tokens=12)))
    b = texts(engine.run(ask(temperature=1.0, seed=7, max_new_tokens=12)))
    c = texts(engine.run(ask(temperature=1.0, seed=8, max_new_tokens=12)))
    assert a == b
    assert a != c


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK", "LA"])
def test_image_modes_are_accepted(engine, mode):
    img = scene().convert("RGBA" if mode in ("RGBA", "LA") else "RGB")
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(scene().convert("L"), np.uint16) * 257)
    events = engine.run(ask(images=[img], max_new_tokens=2))
    assert isinstance(events[-1], Done), events[-1]


def test_browser_audio_any_rate_stereo_int16(engine):
    rate = 44100
    t = np.arange(rate) / rate
    stereo = (np.stack([np.sin(2 * np.pi * 300 * t)] * 2, axis=1) * 12000).astype(np.int16)
    events = engine.run(ask(audios=[Audio(stereo, rate)], max_new_tokens=2))
    assert isinstance(events[-1], Done)
    focus = [e for e in events if isinstance(e, Focus)][0]
    assert focus.audios[0].shape == (26,)  # 1 s at 16 kHz -> 101 mel frames -> 26 audio tokens


def test_too_long_recording_is_a_clear_error(engine):
    with pytest.raises(BadRequest, match="limit"):
        engine.submit(ask(audios=[tone(31)]))


def test_empty_question_is_a_clear_error(engine):
    with pytest.raises(BadRequest, match="empty"):
        engine.submit(ask(text="   "))


# ----------------------------------------------------------------------------- context


def test_oldest_turns_dropped_to_fit_context_with_a_notice(small):
    eng = make_engine(*small, context_limit=160)
    try:
        long = "describe the shapes in the picture please " * 4
        history = []
        for i in range(6):
            history += [Message("user", f"{i} {long}"), Message("assistant", "A red circle.")]
        req = ChatRequest(history + [Message("user", "And now?")], Options(max_new_tokens=8, seed=0))
        events = eng.run(req)
        notices = [e for e in events if isinstance(e, Notice)]
        assert notices and "oldest" in notices[0].message
        assert isinstance(events[-1], Done)
        assert events[-2].prompt_tokens + 8 <= 160

        too_long = ChatRequest([Message("user", long * 10)], Options(max_new_tokens=8))
        events = eng.run(too_long)
        assert isinstance(events[-1], Error) and events[-1].kind == "bad_request"
        assert "context" in events[-1].message
    finally:
        eng.close()


# ----------------------------------------------------------------------------- queue and cancellation


def test_cancel_stops_within_one_token_and_frees_the_worker(engine):
    handle = engine.submit(ask(max_new_tokens=4000, min_new_tokens=4000, focus=False))
    seen_after_cancel = 0
    cancelled_at = None
    for event in handle.events():
        if isinstance(event, Routing):
            if cancelled_at is None and event.index == 5:
                handle.cancel()
                cancelled_at = event.index
            elif cancelled_at is not None:
                seen_after_cancel += 1
        if isinstance(event, Done):
            assert event.finish_reason == "cancelled"
    assert seen_after_cancel <= 1
    start = time.perf_counter()
    assert isinstance(engine.run(ask(max_new_tokens=2))[-1], Done)
    assert time.perf_counter() - start < 5


def test_closing_the_event_stream_cancels_the_request(engine):
    handle = engine.submit(ask(max_new_tokens=4000, min_new_tokens=4000))
    stream = handle.events()
    for event in stream:
        if isinstance(event, Answer):
            break
    stream.close()
    assert handle.cancelled
    assert isinstance(engine.run(ask(max_new_tokens=2))[-1], Done)


def test_four_sessions_at_once_get_their_own_answers(engine):
    requests = [ask(text=f"question {i}?", session=f"user-{i}", temperature=1.0, seed=100 + i,
                    images=[scene((40 * i, 200 - 40 * i, 90))], max_new_tokens=10) for i in range(4)]
    alone = [texts(engine.run(r)) for r in requests]
    results: dict[int, tuple] = {}

    def worker(i):
        results[i] = texts(engine.run(requests[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(4)] == alone
    assert len(set(alone)) == 4


def test_full_queue_gives_busy_error_and_positions_are_reported(small):
    eng = make_engine(*small, max_queue=2)
    try:
        running = eng.submit(ask(max_new_tokens=4000, min_new_tokens=4000, session="a"))
        stream = running.events()
        assert next(stream) == Queued(0)
        next(e for e in stream if isinstance(e, Routing))  # it is running now
        waiting = [eng.submit(ask(session=s)) for s in ("b", "c")]
        with pytest.raises(EngineBusy, match="busy") as exc:
            eng.submit(ask(session="d"))
        assert exc.value.retry_after > 0
        positions = [next(w.events()) for w in waiting]
        assert positions == [Queued(1), Queued(2)]
        running.cancel()
        for w in waiting:
            assert isinstance(list(w.events())[-1], Done)
    finally:
        eng.close()


def test_round_robin_across_sessions_and_interactive_before_batch(small):
    # one slot, so each request is taken only when the one before it is done: the order they get it is the fair
    # order (with free slots the worker takes them all between two steps, in that order, within microseconds)
    eng = make_engine(*small, max_queue=10, max_batch=1)
    order: list[str] = []
    try:
        blocker = eng.submit(ask(max_new_tokens=4000, min_new_tokens=4000, session="blocker"))
        next(e for e in blocker.events() if isinstance(e, Routing))
        handles = []
        for name, session, priority in [("a1", "A", "interactive"), ("a2", "A", "interactive"),
                                        ("a3", "A", "interactive"), ("batch", "C", "batch"),
                                        ("b1", "B", "interactive")]:
            req = ask(session=session, max_new_tokens=1)
            req.priority = priority
            handles.append((name, time.perf_counter(), eng.submit(req)))
        blocker.cancel()
        started = {}
        for name, submitted, h in handles:
            stats = [e for e in h.events() if isinstance(e, Stats)][0]
            started[name] = submitted + stats.queue_s  # when the worker took it
        order = sorted(started, key=started.get)
    finally:
        eng.close()
    assert order.index("b1") < order.index("a2")  # B is not starved behind all of A
    assert order[-1] == "batch"


def test_stopping_a_queued_request_ends_it_at_once_and_moves_the_queue_up(small):
    eng = make_engine(*small, max_queue=10)
    try:
        blocker = eng.submit(ask(max_new_tokens=4000, min_new_tokens=4000, session="blocker"))
        next(e for e in blocker.events() if isinstance(e, Routing))
        first = eng.submit(ask(session="a", max_new_tokens=1))
        second = eng.submit(ask(session="b", max_new_tokens=1))
        stream = second.events(timeout=30)  # one iterator: dropping one early would cancel the request
        assert next(stream) == Queued(2)
        first.cancel()
        # no waiting for the running request: the cancelled one is finished and the next moves up
        assert list(first.events(timeout=5))[-1] == Done("cancelled")
        assert next(stream) == Queued(1)
        assert eng.queue_length() == 1
        blocker.cancel()
        assert isinstance(list(stream)[-1], Done)
    finally:
        eng.close()


def test_new_sessions_do_not_overtake_a_returning_session(small):
    """Anonymous API calls each get a fresh session; they must queue behind a returning user
    (a UI tab on its second turn) who was already waiting, not jump ahead of them."""
    eng = make_engine(*small, max_queue=10)
    try:
        assert isinstance(eng.run(ask(session="tab", max_new_tokens=1))[-1], Done)  # the tab's first turn
        blocker = eng.submit(ask(max_new_tokens=4000, min_new_tokens=4000, session="blocker"))
        next(e for e in blocker.events() if isinstance(e, Routing))
        handles = [("tab", eng.submit(ask(session="tab", max_new_tokens=1)))]
        handles += [(f"anon{i}", eng.submit(ask(session=f"anon-{i}", max_new_tokens=1))) for i in range(3)]
        streams = {name: h.events(timeout=30) for name, h in handles}  # one iterator each (see events())
        positions = {name: next(streams[name]).position for name, _ in handles}
        blocker.cancel()
        for name in streams:
            assert list(streams[name])[-1] == Done("length"), name
    finally:
        eng.close()
    assert positions["tab"] == 1 and sorted(positions.values()) == [1, 2, 3, 4], positions


def test_media_placeholders_are_never_sampled(engine, small, monkeypatch):
    processor = small[1]
    banned = [processor.image_token_id, processor.audio_token_id, processor.boi, processor.eoa,
              processor.tokenizer.pad_token_id]
    seen = []
    real = sampling.sample

    def checking(logits, *args):
        seen.append(bool(torch.isinf(logits[banned]).all()))
        return real(logits, *args)

    monkeypatch.setattr(sampling, "sample", checking)
    events = engine.run(ask(text="Tell me a very long story.", enable_thinking=False, temperature=0,
                            max_new_tokens=30))
    assert isinstance(events[-1], Done)
    assert seen and all(seen)


def test_model_that_does_not_hear_gets_the_transcript(small, monkeypatch):
    eng = make_engine(*small)
    try:
        monkeypatch.setattr(eng.family, "hears_audio", False)
        with pytest.raises(BadRequest, match="asr-model"):
            eng.submit(ask(audios=[tone()]))
        eng.transcribe = lambda audio: f"heard {len(audio.samples) // 16000} s"
        handle = eng.submit(ask(text="and?", audios=[tone()]))
        assert handle.request.messages[-1].text == "heard 1 s and?"
        assert handle.request.messages[-1].audios == []
        assert isinstance(list(handle.events())[-1], Done)
    finally:
        eng.close()


# ----------------------------------------------------------------------------- the loop's pieces


def greedy_by_hand(model, inputs: dict, banned: list[int], n: int) -> list[int]:
    """Reference: the plain cached loop (one forward per token, banned ids masked, argmax), no engine code."""
    from transformers.cache_utils import DynamicCache

    cache, tokens, memory = DynamicCache(), [], None
    with torch.inference_mode():
        out = model(**inputs, past_key_values=cache, use_cache=True, memory_state=None)
        for _ in range(n):
            logits = out.logits[0, -1].float().clone()
            logits[banned] = float("-inf")
            tokens.append(int(logits.argmax()))
            memory = out.memory_state
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                        memory_state=memory)
    return tokens


def test_prefill_and_decode_step_pick_the_tokens_of_the_plain_cached_loop(engine, small):
    from transformers.cache_utils import DynamicCache

    model, processor = small
    rt = engine.rt
    request = ask(images=[scene()], audios=[tone(0.5)], temperature=0)
    inputs = AUTOGLM.prepare(processor, request.messages, True).inputs
    sampler = sampling.Sampler(request.options, inputs["input_ids"][0], rt.banned_ids, [])
    cache = DynamicCache()
    with torch.inference_mode():
        token, memory = generation.prefill(rt, inputs, cache, None, sampler)
        tokens = [token]
        for _ in range(5):
            token, memory = generation.decode_step(rt, token, cache, memory, sampler)
            tokens.append(token)
    assert tokens == greedy_by_hand(model, inputs, rt.banned_ids, 6)


def test_engine_answer_is_the_decoded_greedy_tokens(engine, small):
    model, processor = small
    request = ask(text="Describe the image.", images=[scene()], temperature=0, max_new_tokens=6,
                  enable_thinking=False, min_new_tokens=6)
    events = engine.run(request)
    inputs = AUTOGLM.prepare(processor, request.messages, False).inputs
    banned = sorted(set(engine.rt.banned_ids) | set(engine.rt.stop_list))  # min_new_tokens keeps the stops out
    expected = processor.tokenizer.decode(greedy_by_hand(model, inputs, banned, 6), skip_special_tokens=False)
    assert texts(events) == ("", expected)
    assert events[-2].completion_tokens == 6 and events[-2].finish_reason == "length"


def test_sampler_keeps_stop_ids_out_until_min_new_tokens_and_never_picks_banned_ids():
    opts = Options(temperature=0, min_new_tokens=2)
    sampler = sampling.Sampler(opts, torch.tensor([5, 6]), banned_ids=[3], stop_ids=[0])
    logits = torch.tensor([9.0, 1.0, 2.0, 8.0, 0.0])  # 0 is the stop id, 3 banned
    picks = []
    for _ in range(3):
        picks.append(sampler.pick(logits.clone()))
        sampler.accept(picks[-1])
    assert picks == [2, 2, 0]
    assert sampler.kept == 3 and sampler.seen.tolist() == [5, 6]  # no penalty: nothing more is kept


def test_sampler_repetition_penalty_lowers_tokens_already_seen():
    opts = Options(temperature=0, repetition_penalty=4.0)
    sampler = sampling.Sampler(opts, torch.tensor([1]), banned_ids=[], stop_ids=[])
    logits = torch.tensor([0.0, 4.0, 3.0, 2.5])
    assert sampler.pick(logits.clone()) == 2  # 4.0 / 4 for the prompt's token 1
    sampler.accept(2)
    assert sampler.seen.tolist() == [1, 2]
    assert sampler.pick(logits.clone()) == 3


def test_the_same_seed_gives_the_same_sampled_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        sampler = sampling.Sampler(Options(temperature=1.0, top_p=1.0, seed=7), torch.tensor([0]), [], [])
        runs.append([sampler.pick(logits.clone()) for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_the_family_is_asked_once_per_engine_not_per_request(small, monkeypatch):
    eng = make_engine(*small)
    try:
        asked = []
        for name in ("stop_ids", "banned_ids", "attention_modules", "routers", "num_experts", "num_layers",
                     "default_focus"):
            real = getattr(eng.family, name)
            monkeypatch.setattr(eng.family, name, lambda *a, _n=name, _r=real, **k: asked.append(_n) or _r(*a, **k))
        for _ in range(2):
            events = eng.run(ask(images=[scene()], max_new_tokens=3))
            assert isinstance(events[-1], Done)
            assert any(isinstance(e, Routing) for e in events) and any(isinstance(e, Focus) for e in events)
    finally:
        eng.close()
    assert asked == []
    assert eng.rt.num_layers == small[0].config.num_hidden_layers
    assert (eng.rt.num_experts, eng.rt.top_k) == (small[0].config.num_experts, small[0].config.num_experts_per_tok)


def test_a_prompt_that_fits_is_prepared_once_and_never_counted(small, monkeypatch):
    model, processor = small
    calls = []
    real_prepare, real_count = AUTOGLM.prepare, AUTOGLM.count_tokens
    monkeypatch.setattr(AUTOGLM, "prepare", lambda *a, **k: calls.append("prepare") or real_prepare(*a, **k))
    monkeypatch.setattr(AUTOGLM, "count_tokens", lambda *a, **k: calls.append("count") or real_count(*a, **k))
    messages = [Message("user", "hi"), Message("assistant", "A red circle."), Message("user", "and?", [scene()])]
    prep, dropped = generation.fit_context(AUTOGLM, processor, messages, Options(max_new_tokens=8), 8192)
    assert calls == ["prepare"] and dropped == 0
    assert prep.inputs["input_ids"].shape == real_prepare(processor, messages, True).inputs["input_ids"].shape


def test_dropping_turns_counts_the_shorter_prompts_and_prepares_the_one_that_fits(small, monkeypatch):
    model, processor = small
    long = "describe the shapes in the picture please " * 4
    messages = [Message("system", "Be brief.")]
    for i in range(4):
        messages += [Message("user", f"{i} {long}"), Message("assistant", "A red circle.")]
    messages.append(Message("user", "And now?"))
    calls = []
    real_prepare, real_count = AUTOGLM.prepare, AUTOGLM.count_tokens
    monkeypatch.setattr(AUTOGLM, "prepare", lambda *a, **k: calls.append("prepare") or real_prepare(*a, **k))
    monkeypatch.setattr(AUTOGLM, "count_tokens", lambda *a, **k: calls.append("count") or real_count(*a, **k))
    opts = Options(max_new_tokens=8)
    prep, dropped = generation.fit_context(AUTOGLM, processor, messages, opts, 120)
    kept = [messages[0]] + messages[1 + 2 * dropped:]
    assert dropped >= 1 and calls == ["prepare"] + ["count"] * dropped + ["prepare"]
    assert torch.equal(prep.inputs["input_ids"], real_prepare(processor, kept, True).inputs["input_ids"])
    assert prep.inputs["input_ids"].shape[1] + 8 <= 120
    assert real_count(processor, kept[:1] + messages[1 + 2 * (dropped - 1):], True) + 8 > 120  # one fewer drop: too long


def test_autoglm_count_tokens_is_the_prepared_prompt_length(small):
    processor = small[1]
    for messages in ([Message("user", "hi")],
                     [Message("system", "Be brief."), Message("user", "what is it?", [scene(), scene()], [tone(0.7)])],
                     [Message("user", "", [], [tone(1.3)]), Message("assistant", "A tone."), Message("user", "more")]):
        for thinking in (True, False):
            prepared = AUTOGLM.prepare(processor, messages, thinking).inputs["input_ids"].shape[1]
            assert AUTOGLM.count_tokens(processor, messages, thinking) == prepared


def test_engine_is_idle_when_nothing_runs_or_waits(small):
    eng = make_engine(*small)
    try:
        assert eng.idle
        handle = eng.submit(ChatRequest([Message("user", "hi")], Options(max_new_tokens=64, min_new_tokens=64)))
        events = handle.events()
        next(events)  # queued / running
        assert not eng.idle
        events.close()  # cancels
        deadline = time.time() + 10
        while not eng.idle and time.time() < deadline:
            time.sleep(0.02)
        assert eng.idle
    finally:
        eng.close()
