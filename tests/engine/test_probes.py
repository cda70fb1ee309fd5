"""The routing probe's counts, the Routing event as plain data, and timings -> Stats."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from autoglm_app.engine.probes import RoutingProbe
from autoglm_app.engine.stats import Timeline, timing_stats
from autoglm_app.events import ExpertCounts, LayerRoute, Routing, expert_load
from autoglm_app.families import AUTOGLM


class FakeRouter(torch.nn.Module):
    """Returns the routes it is given, in AutoGLMRouter's (probs, experts, weights, kept) form."""

    def __init__(self):
        super().__init__()
        self.route = None

    def forward(self, x):
        return self.route


def route(experts: list[list[int]], kept: list[list[bool]] | None = None) -> tuple:
    e = torch.tensor(experts)
    k = torch.ones_like(e, dtype=torch.bool) if kept is None else torch.tensor(kept)
    return None, e, torch.full(e.shape, 0.5), k


def forward(routers: list[FakeRouter], routes: list[tuple]) -> None:
    for r, out in zip(routers, routes):
        r.route = out
        r(torch.zeros(1))


@pytest.fixture
def probe():
    routers = [FakeRouter(), FakeRouter()]
    p = RoutingProbe([(1, routers[0]), (3, routers[1])], num_experts=4, top_k=2, read_route=AUTOGLM.read_route)
    return p, routers


def test_counts_fold_each_forward_by_phase_and_modality_and_are_copies(probe):
    p, routers = probe
    with p:
        p.modality = torch.tensor([0, 1, 2])  # a prompt of text, image, audio
        forward(routers, [route([[0, 1], [1, 2], [2, 3]]), route([[3, 0], [0, 1], [1, 2]], [[1, 1], [1, 0], [1, 1]])])
        last = p.collect()
        prefill = p.counts()
        p.start_decode()
        forward(routers, [route([[0, 3]]), route([[2, 3]])])
        p.collect()
        after = p.counts()
    assert last == [(1, [2, 3], [0.5, 0.5]), (3, [1, 2], [0.5, 0.5])]  # the newest token's route per layer
    assert prefill.prefill.tolist() == [[1, 2, 2, 1], [2, 1, 1, 1]] and prefill.decode.sum() == 0
    assert prefill.dropped.tolist() == [0, 1] and prefill.tokens == {"prefill": 3, "decode": 0}
    assert prefill.by_modality["image"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert prefill.by_modality["audio"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    # later tokens do not change what an earlier event carries
    assert after.decode.tolist() == [[1, 0, 0, 1], [0, 0, 1, 1]] and prefill.decode.sum() == 0
    assert after.tokens == {"prefill": 3, "decode": 1} and after.by_modality["text"].sum() == 4 + 4  # 2 choices x 2 layers, prompt and decode
    assert not routers[0]._forward_hooks  # leaving the probe removes its hooks


def test_expert_load_has_the_shape_consumers_read_and_right_balance_figures():
    pre = np.array([[3, 1, 0, 0], [1, 1, 1, 1]], np.int64)
    dec = np.array([[1, 0, 0, 0], [0, 0, 0, 2]], np.int64)
    mods = {m: np.full((2, 4), i, np.int64) for i, m in enumerate(("text", "image", "audio"))}
    counts = ExpertCounts([1, 3], 4, 2, {"prefill": 4, "decode": 1}, pre, dec, mods, np.array([0, 2]))
    load = expert_load(counts)
    total = pre + dec
    new_keys = {"window_tokens", "balancedness", "dead_fraction", "diversity", "by_phase", "phase_tokens"}
    assert new_keys <= set(load)  # issue 20's figures come on top; every earlier key is unchanged:
    assert {k: v for k, v in load.items() if k not in new_keys} == {
        "layers": [1, 3], "experts": 4, "top_k": 2, "tokens": {"prefill": 4, "decode": 1},
        "prefill": pre.tolist(), "decode": dec.tolist(), "total": total.tolist(),
        "by_modality": {m: v.tolist() for m, v in mods.items()}, "dropped": [0, 2],
        "cv": pytest.approx([float(r.std() / r.mean()) for r in total]),
        "entropy": pytest.approx([-sum(q * math.log(q) for q in r[r > 0] / r.sum()) / math.log(4) for r in total]),
    }
    assert all(type(v) in (list, dict, int) for v in load.values())  # JSON-ready: lists, not arrays


def test_a_routing_event_is_plain_data_and_builds_its_load_once():
    counts = ExpertCounts([0], 2, 1, {"prefill": 1, "decode": 0}, np.array([[1, 0]]), np.zeros((1, 2), np.int64),
                          {"text": np.array([[1, 0]])}, np.zeros(1, np.int64))
    event = Routing(0, "a", "answer", [LayerRoute(0, [0], [1.0])], counts)
    for name, value in vars(event).items():
        assert not callable(value), name
    again = pickle.loads(pickle.dumps(event))  # no closure or model object inside
    assert again.load == event.load and event.load["total"] == [[1, 0]]
    assert event.load is event.load  # built on first read, then kept
    hand_built = {"layers": [0], "total": [[2, 0]]}
    assert Routing(1, "b", "answer", [], hand_built).load is hand_built
    routed = Routing(2, "c", "answer", None, None, route=([0, 3], np.array([[1, 0], [2, 1]]), np.array([[.6, .4], [.7, .3]])))
    again = pickle.loads(pickle.dumps(routed))
    assert [(r.layer, r.experts, r.weights) for r in again.layers] == [(0, [1, 0], [.6, .4]), (3, [2, 1], [.7, .3])]
    assert routed.layers is routed.layers and routed.load is None


def test_timing_stats_rates_per_phase_from_the_timeline():
    tl = Timeline(start=10.0)
    tl.first_token(11.0)
    for t in (11.0, 12.0, 13.0):
        tl.piece("reasoning", t)
    for t in (14.0, 15.0, 16.0):
        tl.piece("answer", t)
    s = timing_stats(tl, 16.0, reasoning_tokens=3, answer_tokens=3, completion_tokens=6, prompt_tokens=9,
                     finish_reason="stop", attention="sdpa", peak_memory={})
    assert (s.ttft_s, s.think_s, s.total_s) == (1.0, 4.0, 6.0)
    assert s.reasoning_tps == pytest.approx(1.0) and s.answer_tps == pytest.approx(1.5)
    assert s.tokens_per_second == pytest.approx(1.0)  # 5 tokens after the first, in 5 s
    assert (s.prompt_tokens, s.completion_tokens, s.queue_s) == (9, 6, 0.0)


def test_an_answer_without_reasoning_runs_from_the_first_token():
    tl = Timeline(start=0.0)
    for t in (1.0, 2.0, 3.0):
        tl.piece("answer", t)
    s = timing_stats(tl, 3.0, reasoning_tokens=0, answer_tokens=3, completion_tokens=3, prompt_tokens=1,
                     finish_reason="length", attention="sdpa", peak_memory={})
    assert s.think_s is None and s.reasoning_tps == 0.0
    assert s.answer_tps == pytest.approx(1.5) and s.tokens_per_second == pytest.approx(1.0)


def test_no_token_at_all_gives_zero_rates_and_ttft_at_the_end():
    s = timing_stats(Timeline(start=2.0), 5.0, reasoning_tokens=0, answer_tokens=0, completion_tokens=0,
                     prompt_tokens=4, finish_reason="cancelled", attention="sdpa", peak_memory={})
    assert s.ttft_s == 3.0 and s.tokens_per_second == s.answer_tps == s.reasoning_tps == 0.0
