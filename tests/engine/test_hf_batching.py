"""Continuous batching for the transformers families: the requests in flight share one forward of the model's own
text layers over a slot cache (``engine.hf_decoding``), and each request's tokens, focus and routing equal what it
gives alone through the model's own forward and DynamicCache (``Generation.run``, the path the probe tests check
against eager attention and the routers' outputs).

fp32 weights: the equality is to the last bit of the logits' argmax and to 1e-4 in the focus rows (in fp16, int4's
activations, a batched matmul can round the last bit of a gate weight differently)."""

from __future__ import annotations

import threading

import pytest
import torch

from autoglm_app.engine.decoding import RequestDecoder
from autoglm_app.engine.hf_decoding import HFBatchDecoder
from autoglm_app.events import Answer, Done, Reasoning
from autoglm_app.loading.checkpoints import load_model
from tests import tiny_families as tiny
from tests.engine.test_batching import assert_same_answer, run_together, solo, widest_step
from tests.engine.test_engine import ask, scene, tone
from tests.helpers import make_engine

BUILDERS = {"glm4v": tiny.build_glm4v, "qwen3_vl_moe": tiny.build_qwen3_vl_moe, "qwen2_5_omni": tiny.build_qwen2_5_omni}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_model(request, tmp_path_factory):
    loaded = load_model(BUILDERS[request.param](tmp_path_factory.mktemp(request.param)), quantize="fp32")
    return request.param, loaded


def mixed(name: str) -> list:
    """Image and text-only prompts (their M-RoPE offsets differ), lengths that leave at different steps, a sampled
    row with its seed, a row asking for logprobs; a recording where the model hears."""
    audio = [tone(0.5)] if name == "qwen2_5_omni" else None
    return [
        ask(images=[scene()], temperature=0, max_new_tokens=6, min_new_tokens=6, focus=True, routing=True, session="a"),
        ask("Say something.", temperature=0, max_new_tokens=11, min_new_tokens=11, focus=True, routing=True,
            logprobs=3, session="b"),
        ask(images=[scene((30, 30, 220)), scene()], audios=audio, temperature=0, max_new_tokens=9, min_new_tokens=9,
            focus=True, routing=True, session="c"),
        ask(images=[scene()], temperature=0.9, top_p=0.9, seed=7, max_new_tokens=8, min_new_tokens=8, focus=False,
            routing=True, session="d"),
    ]


def test_requests_of_a_transformers_family_decoded_together_equal_each_alone(family_model):
    name, loaded = family_model
    engine = make_engine(loaded.model, loaded.processor, max_batch=3, context_limit=512)
    try:
        info = engine.info()["decoding"]
        assert info["batched"] and isinstance(engine.decoder, HFBatchDecoder), info
        requests = mixed(name)
        alone = [solo(engine, r) for r in requests]
        sizes = widest_step(engine)
        together = run_together(engine, requests)
        assert max(sizes) == 3  # three shared a step; the fourth waited for a slot, then joined (moved slots)
        for b, a in zip(together, alone):
            assert isinstance(b[-1], Done)
            assert_same_answer(b, a)
        assert engine.idle or not engine._active
    finally:
        engine.close()


def test_the_slot_cache_is_the_kv_memory_accounted(family_model):
    _, loaded = family_model
    engine = make_engine(loaded.model, loaded.processor, max_batch=2, context_limit=256)
    try:
        kv = engine.decoder.kv
        held = sum(t.numel() * t.element_size() for t in kv.keys + kv.values)
        assert engine.info()["decoding"]["kv_bytes"] == held == 2 * engine.decoder.slot_bytes
        assert kv.keys[0].shape[0] == 2 and kv.keys[0].shape[2] == 256
    finally:
        engine.close()


def test_a_cancelled_transformers_request_leaves_within_one_step_and_the_others_go_on(family_model):
    _, loaded = family_model
    engine = make_engine(loaded.model, loaded.processor, max_batch=3, context_limit=512)
    try:
        requests = [ask(images=[scene()], temperature=0, max_new_tokens=30, min_new_tokens=30, focus=True,
                        routing=True, session=s) for s in ("x", "y", "z")]
        alone = [solo(engine, requests[i]) for i in (0, 2)]
        handles = [engine.submit(r) for r in requests]
        after_cancel: list = []
        cancelled = threading.Event()

        def read_and_cancel():
            seen = 0
            for e in handles[1].events(timeout=60):
                if cancelled.is_set():
                    after_cancel.append(e)
                elif isinstance(e, (Reasoning, Answer)):
                    seen += 1
                    if seen == 4:
                        handles[1].cancel()
                        cancelled.set()

        reader = threading.Thread(target=read_and_cancel)
        reader.start()
        others = [list(handles[i].events(timeout=120)) for i in (0, 2)]
        reader.join(timeout=60)
        assert sum(isinstance(e, (Reasoning, Answer)) for e in after_cancel) <= 1
        assert isinstance(after_cancel[-1], Done) and after_cancel[-1].finish_reason == "cancelled"
        for b, a in zip(others, alone):
            assert_same_answer(b, a)
    finally:
        engine.close()


def test_a_model_with_sliding_window_layers_decodes_each_request_alone_and_says_why(tmp_path):
    """One mask serves every layer in the batched step, so a sliding-window layer keeps the per-request path."""
    loaded = load_model(tiny.build_qwen2_5_vl(tmp_path / "q"), quantize="fp32")
    text = loaded.model.model.language_model
    text.config.layer_types = ["sliding_attention"] * len(text.config.layer_types)
    engine = make_engine(loaded.model, loaded.processor, max_batch=2, context_limit=256)
    try:
        info = engine.info()["decoding"]
        assert isinstance(engine.decoder, RequestDecoder) and not info["batched"]
        assert "sliding-window" in info["note"]
    finally:
        engine.close()


def test_the_compiled_transformers_step_equals_the_eager_one(tmp_path, caplog):
    """torch.compile of the step with its telemetry inside (the routers' hooks traced into the graph): the same
    mixed requests give the same answers, focus and routes as each alone; warm-up timed both forms."""
    loaded = load_model(tiny.build_qwen3_vl_moe(tmp_path / "moe"), quantize="fp32")
    with caplog.at_level("INFO", logger="autoglm_app.engine.hf_decoding"):
        engine = make_engine(loaded.model, loaded.processor, max_batch=3, context_limit=512, compile="on")
    try:
        info = engine.info()["decoding"]
        assert set(info["step_ms"]) == {"eager", "compiled", "eager, 3 rows", "compiled, 3 rows"}, info
        assert info["compile_warmup_s"] > 0, info
        assert any("decode step: eager" in r.getMessage() for r in caplog.records)
        engine.decoder.use("compiled")
        requests = mixed("qwen3_vl_moe")
        alone = [solo(engine, r) for r in requests]
        sizes = widest_step(engine)
        together = run_together(engine, requests)
        assert max(sizes) == 3
        for b, a in zip(together, alone):
            assert isinstance(b[-1], Done)
            assert_same_answer(b, a)
        assert engine.info()["decoding"]["compiled"]
        # one row eager, more compiled (the forms warm-up may choose apart): a request whose batch thins out to itself
        # changes form mid-answer, and the routers' hooks follow the form
        engine.decoder.use("eager", "compiled")
        assert engine.info()["decoding"]["step"] == "eager for one row, compiled for more"
        for b, a in zip(run_together(engine, requests), alone):
            assert_same_answer(b, a)
    finally:
        engine.close()


def test_compile_auto_leaves_the_transformers_step_eager_on_a_cpu(family_model):
    """``--compile auto`` compiles this step on a GPU only: on the CPU its compile and warm-up took minutes for a
    loss at 8 rows (docs/PERFORMANCE.md), so the page comes up at once."""
    _, loaded = family_model
    engine = make_engine(loaded.model, loaded.processor, max_batch=2, context_limit=256, compile="auto")
    try:
        info = engine.info()["decoding"]
        assert info["batched"] and not info["compiled"] and info["step"] == "eager" and info["step_ms"] == {}, info
    finally:
        engine.close()
