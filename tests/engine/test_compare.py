"""Compare mode's metrics (engine/compare.py) on the shipped demo model: a model against itself is identical,
KL 0, Jaccard 1; against a perturbed copy it is not; the teacher-forced pass reproduces what generation saw."""

from __future__ import annotations

import copy
import random
import threading

import numpy as np
import pytest
import torch

from autoglm_app.config import DEMO_MODEL, Limits
from autoglm_app.engine import compare as C
from autoglm_app.engine.worker import Engine
from autoglm_app.events import ChatRequest, Focus, Message, Options

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="no demo checkpoint")


def _engine(loaded):
    return Engine(loaded, Limits(context_limit=1024))


@pytest.fixture(scope="module")
def engines():
    """A: the demo model (fp32); B: a second load of it (what --compare-quantize fp32 gives an fp32 A);
    P: a copy of A with noise on its attention and expert weights."""
    from autoglm_app.loading.checkpoints import load_model

    a = load_model(str(DEMO_MODEL), quantize="fp32")
    b = load_model(str(DEMO_MODEL), quantize="fp32")
    p = copy.copy(a)
    p.model = copy.deepcopy(a.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in p.model.named_parameters():
            if name.startswith("model.layers.") and w.ndim == 2:
                w.add_(torch.randn(w.shape, generator=gen) * w.std())  # as much noise as signal: the answer changes
    made = [_engine(x) for x in (a, b, p)]
    yield made
    for e in made:
        e.close()


def turn(seed: int = 0, task: str = "where") -> list[Message]:
    from training.shapesworld import make_qa, random_scene, render

    rng = random.Random(10**9 + seed)
    scene = random_scene(rng, 160)
    qa = make_qa(scene, rng, task)
    return [Message("user", qa.question, [render(scene)])]


OPTS = C.with_token_ids(Options(temperature=0.0, max_new_tokens=64, seed=0))


def answer(engine, messages, opts=OPTS):
    events = engine.run(ChatRequest(messages, opts))
    return C.Side.of(events), events


def test_a_model_against_itself_is_identical_kl_0_jaccard_1(engines):
    a, b, _ = engines
    msgs = turn()
    side_a, _ = answer(a, msgs)
    side_b, _ = answer(b, msgs)
    assert side_a.token_ids and side_a.answer
    result = C.compare_engines(a, b, msgs, side_a, side_b, OPTS)
    s = result["summary"]
    assert result["note"] is None
    assert s["identical"] is True and s["diverge_at"] is None
    assert s["argmax_agreement"] == 1.0
    assert s["kl_mean"] == pytest.approx(0.0, abs=1e-9) and s["kl_max"] == pytest.approx(0.0, abs=1e-9)
    assert s["routing_jaccard"] == 1.0
    assert s["focus_1_minus_cos"] == pytest.approx(0.0, abs=1e-9)
    assert s["peak_distance"] == 0.0 and s["peak_agreement"] == 1.0
    assert len(result["per_token"]) == len(side_a.token_ids)
    assert all(v == 1.0 for v in result["routing_per_layer"]) and len(result["routing_per_layer"]) == 4


def test_a_perturbed_copy_is_not_identical(engines):
    a, _, p = engines
    msgs = turn()
    side_a, _ = answer(a, msgs)
    side_p, _ = answer(p, msgs)
    result = C.compare_engines(a, p, msgs, side_a, side_p, OPTS)
    s = result["summary"]
    assert s["identical"] is False and s["diverge_at"] is not None
    assert result["diverge_tokens"][0] != result["diverge_tokens"][1]
    assert s["kl_mean"] > 1e-2
    assert s["argmax_agreement"] < 1.0
    assert s["routing_jaccard"] < 1.0
    assert s["focus_1_minus_cos"] > 1e-4
    assert all(0.0 <= t["routing_jaccard"] <= 1.0 for t in result["per_token"])


def test_the_teacher_forced_pass_reproduces_what_generation_saw(engines):
    """A's greedy tokens are the argmax of its own teacher-forced distributions, and each token's focus map is
    the one generation's Focus event gave (the attention of the position that predicted it)."""
    a, _, _ = engines
    msgs = turn(1, "color")
    side, events = answer(a, msgs)
    forced = C.forced_pass(a, msgs, OPTS, side.token_ids)
    assert forced.logprobs.shape == (len(side.token_ids), 541)
    assert forced.logprobs.argmax(-1).tolist() == side.token_ids
    np.testing.assert_allclose(np.exp(forced.logprobs).sum(-1), 1.0, rtol=1e-5)
    focus = {e.index: e.images[0] for e in events if isinstance(e, Focus)}
    assert len(focus) == len(side.token_ids)
    for i, m in focus.items():
        np.testing.assert_allclose(forced.images[0][i], m, atol=2e-4)
    assert forced.routes.shape == (len(side.token_ids), 4, 2)


def test_different_answers_part_at_the_first_different_token():
    assert C.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert C.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert C.first_difference([1, 2], [1, 2, 3]) == 2


def test_kl_and_jaccard_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    la, lb = (torch.log_softmax(torch.randn(5, 11, generator=gen), -1) for _ in range(2))
    expected = torch.nn.functional.kl_div(lb, la, log_target=True, reduction="none").sum(-1)
    np.testing.assert_allclose(C.kl_divergence(la.numpy(), lb.numpy()), expected.numpy(), rtol=1e-5)
    a = np.array([[[0, 1], [2, 3]]])
    b = np.array([[[1, 0], [2, 1]]])
    np.testing.assert_allclose(C.jaccard(a, b), [[1.0, 1 / 3]])
    one_minus_cos, peak = C.map_difference(np.eye(3), np.eye(3)[::-1].copy())
    assert one_minus_cos == pytest.approx(2 / 3) and peak == 2.0  # first maxima: (0, 0) and (0, 2)


def test_call_runs_on_the_worker_and_passes_errors_back(engines):
    a = engines[0]
    assert a.call(lambda: threading.current_thread().name) == "autoglm-engine"
    with pytest.raises(ZeroDivisionError):
        a.call(lambda: 1 / 0)
    assert a.call(lambda: 7) == 7  # the worker goes on serving


def test_another_tokenizer_compares_the_answers_only_and_says_why(engines, engine):
    """``engine``: the small random model (its own tokenizer): no teacher-forced figures, the note says why."""
    a = engines[0]
    msgs = turn()
    side_a, _ = answer(a, msgs)
    side_s = C.Side.of(engine.run(ChatRequest(msgs, C.with_token_ids(Options(temperature=0.0, max_new_tokens=8)))))
    result = C.compare_engines(a, engine, msgs, side_a, side_s, OPTS)
    assert "different tokenizers" in result["note"]
    assert result["identical"] is False and result["per_token"] == []
    assert result["summary"]["kl_mean"] is None and result["summary"]["routing_jaccard"] is None


def test_a_transformers_moe_family_is_teacher_forced_as_it_generated(tmp_path):
    """The pass is the engine's own forward over the cache for every family: on a tiny Qwen3-VL-MoE (M-RoPE,
    fused experts routed by its TopKRouter) the greedy tokens, the focus maps and the routes come back."""
    from PIL import Image

    from autoglm_app.events import Routing
    from autoglm_app.loading.checkpoints import load_model
    from tests.tiny_families import build_qwen3_vl_moe

    e = _engine(load_model(build_qwen3_vl_moe(tmp_path), quantize="fp32"))
    try:
        msgs = [Message("user", "What is this?", [Image.new("RGB", (64, 64), (200, 30, 30))])]
        opts = C.with_token_ids(Options(temperature=0.0, max_new_tokens=12, seed=0))
        side, events = answer(e, msgs, opts)
        forced = C.forced_pass(e, msgs, opts, side.token_ids)
        assert forced.logprobs.argmax(-1).tolist() == side.token_ids
        for ev in events:
            if isinstance(ev, Focus):
                np.testing.assert_allclose(forced.images[0][ev.index], ev.images[0], atol=1e-6)
            if isinstance(ev, Routing):
                assert [sorted(r.experts) for r in ev.layers] == [sorted(x) for x in forced.routes[ev.index].tolist()]
        s = C.compare_engines(e, e, msgs, side, side, opts)["summary"]
        assert s["kl_mean"] == 0.0 and s["routing_jaccard"] == 1.0 and s["identical"]
    finally:
        e.close()
