"""Issue 20's routing figures on scripted routes: balancedness over the last 10 / 100 / 1,000 routed tokens
(hand-computed), dead experts, exp(H)/N diversity, the reasoning / answer split of the decode load, and the
routed-experts array (vLLM's [tokens, moe_layers, top_k] int16 layout) equal to the routing events."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoglm_app.engine.probes import RoutingProbe
from autoglm_app.events import (
    LayerRoute,
    Routing,
    balancedness_rows,
    dead_fraction_rows,
    diversity_rows,
    expert_load,
    routed_experts_array,
    routing_summary,
)
from autoglm_app.families import AUTOGLM
from tests.engine.test_probes import FakeRouter, forward, route


def make_probe(experts: int = 4, top_k: int = 2):
    routers = [FakeRouter(), FakeRouter()]
    p = RoutingProbe([(1, routers[0]), (3, routers[1])], num_experts=experts, top_k=top_k,
                     read_route=AUTOGLM.read_route)
    return p, routers


def run_script(p, routers, prefill: list[tuple], decode: list[tuple[str, tuple]]) -> list[Routing]:
    """Prefill (one forward of several tokens), then one decode forward per (phase, routes) entry: the
    Routing events as the TokenEmitter builds them (event i after the forward that chose token i)."""
    events = []
    with p:
        p.modality = torch.zeros(len(prefill[0][1]), dtype=torch.long)
        forward(routers, prefill)
        events.append(Routing(0, "t0", "reasoning", [LayerRoute(*r) for r in p.collect()], p.counts()))
        for i, (phase, routes) in enumerate(decode, start=1):
            p.start_decode(phase)  # the phase of the token this step routes: the one emitted before it
            forward(routers, list(routes))
            events.append(Routing(i, f"t{i}", "answer", [LayerRoute(*r) for r in p.collect()], p.counts()))
    return events


# ----------------------------------------------------------------------------- the row figures by hand


def test_row_figures_by_hand():
    load = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]])
    assert balancedness_rows(load) == pytest.approx([0.25, 1.0, 0.5, 1.0])  # mean / max; no load: 1
    assert dead_fraction_rows(load) == pytest.approx([0.75, 0.0, 0.5, 1.0])
    # exp(H)/N: one expert -> 1/4; even -> 1; two even -> exp(log 2)/4 = 0.5; no load -> 0
    assert diversity_rows(load) == pytest.approx([0.25, 1.0, 0.5, 0.0])
    skewed = np.array([[3, 1, 0, 0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert diversity_rows(skewed) == pytest.approx([math.exp(h) / 4])


# ----------------------------------------------------------------------------- windows on a scripted sequence


def test_balancedness_windows_on_a_scripted_sequence():
    p, routers = make_probe()
    # prefill: 5 tokens, layer 1 always experts (0, 1), layer 3 always (2, 3)
    prefill = [route([[0, 1]] * 5), route([[2, 3]] * 5)]
    # then 10 decode tokens, layer 1 always (2, 3), layer 3 always (2, 3)
    decode = [("reasoning" if i < 6 else "answer", (route([[2, 3]]), route([[2, 3]]))) for i in range(10)]
    events = run_script(p, routers, prefill, decode)

    after_prefill = events[0].load
    assert after_prefill["window_tokens"] == {"10": 5, "100": 5, "1000": 5}
    # layer 1 over the 5 prompt tokens: [5, 5, 0, 0] -> mean 2.5 / max 5
    assert after_prefill["balancedness"]["10"] == pytest.approx([0.5, 0.5])
    assert after_prefill["dead_fraction"]["10"] == pytest.approx([0.5, 0.5])

    # after 5 decode tokens: the 10-window holds the 5 prompt tokens and 5 decode tokens
    mid = events[5].load
    assert mid["window_tokens"]["10"] == 10
    # layer 1: [5, 5, 5, 5] -> 1.0; layer 3: [0, 0, 10, 10] -> 0.5
    assert mid["balancedness"]["10"] == pytest.approx([1.0, 0.5])
    assert mid["dead_fraction"]["10"] == pytest.approx([0.0, 0.5])

    # after 8 decode tokens: the 10-window lost 3 prompt tokens: layer 1 [2, 2, 8, 8] -> 5 / 8
    late = events[8].load
    assert late["balancedness"]["10"] == pytest.approx([5 / 8, 0.5])
    # the 100 and 1000 windows still hold all 13 tokens: layer 1 [5, 5, 8, 8] -> 6.5 / 8
    assert late["balancedness"]["100"] == pytest.approx([6.5 / 8, 0.5])
    assert late["balancedness"]["1000"] == late["balancedness"]["100"] == late["balancedness"]["all"]

    # after all 10: the 10-window is decode only: layer 1 [0, 0, 10, 10] -> 0.5, half the experts dead
    last = events[10].load
    assert last["window_tokens"] == {"10": 10, "100": 15, "1000": 15}
    assert last["balancedness"]["10"] == pytest.approx([0.5, 0.5])
    assert last["dead_fraction"]["10"] == pytest.approx([0.5, 0.5])
    assert last["dead_fraction"]["all"] == pytest.approx([0.0, 0.5])
    assert last["diversity"] == pytest.approx([diversity_rows(np.array([[5, 5, 10, 10]]))[0], 0.5])
    # earlier events keep what they said (copies)
    assert events[0].load["window_tokens"]["10"] == 5


def test_windows_slide_past_a_thousand_tokens_as_a_brute_force_count_says():
    rng = np.random.default_rng(0)
    E, k = 6, 2
    p, routers = make_probe(E, k)
    picks = [np.stack([rng.permutation(E)[:k], rng.permutation(E)[:k]]) for _ in range(1100)]  # (layers, k)
    prefill_n = 40
    prefill = [route([list(t[0]) for t in picks[:prefill_n]]), route([list(t[1]) for t in picks[:prefill_n]])]
    decode = [("answer", (route([list(t[0])]), route([list(t[1])]))) for t in picks[prefill_n:]]
    last = run_script(p, routers, prefill, decode)[-1].load
    seq = np.stack(picks)  # (tokens, layers, k)
    for w in (10, 100, 1000):
        counts = np.zeros((2, E), np.int64)
        for t in seq[-w:]:
            for layer in range(2):
                counts[layer, t[layer]] += 1
        assert last["balancedness"][str(w)] == pytest.approx(balancedness_rows(counts)), w
        assert last["dead_fraction"][str(w)] == pytest.approx(dead_fraction_rows(counts)), w
    assert last["window_tokens"] == {"10": 10, "100": 100, "1000": 1000}


def test_dropped_choices_stay_out_of_the_windows_as_out_of_the_load():
    p, routers = make_probe()
    prefill = [route([[0, 1], [0, 1]], [[1, 0], [1, 1]]), route([[2, 3], [2, 3]])]
    events = run_script(p, routers, prefill, [("answer", (route([[0, 1]], [[0, 1]]), route([[2, 3]])))])
    load = events[-1].load
    assert load["total"][0] == [2, 2, 0, 0]  # 4 kept choices of 6 in layer 1
    assert load["balancedness"]["10"] == load["balancedness"]["all"] == pytest.approx([0.5, 0.5])


# ----------------------------------------------------------------------------- the phase split


def test_the_reasoning_and_answer_split_sums_to_the_decode_load():
    p, routers = make_probe()
    prefill = [route([[0, 1]] * 3), route([[2, 3]] * 3)]
    decode = [("reasoning", (route([[0, 2]]), route([[1, 3]]))), ("reasoning", (route([[0, 3]]), route([[0, 1]]))),
              ("answer", (route([[1, 2]]), route([[2, 3]])))]
    last = run_script(p, routers, prefill, decode)[-1].load
    by_phase = {ph: np.array(v) for ph, v in last["by_phase"].items()}
    assert set(by_phase) == {"reasoning", "answer"}
    assert (by_phase["reasoning"] + by_phase["answer"]).tolist() == last["decode"]
    assert by_phase["reasoning"].tolist() == [[2, 0, 1, 1], [1, 2, 0, 1]]
    assert by_phase["answer"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert last["phase_tokens"] == {"reasoning": 2, "answer": 1}
    assert sum(last["phase_tokens"].values()) == last["tokens"]["decode"]
    summary = routing_summary(last)
    assert summary["balancedness"] == last["balancedness"] and summary["phase_tokens"] == last["phase_tokens"]
    assert "total" not in summary  # a summary: no per-expert tables


# ----------------------------------------------------------------------------- routed experts


def test_the_routed_experts_array_equals_the_routing_events():
    p, routers = make_probe()
    prefill = [route([[0, 1], [1, 2], [2, 3]]), route([[3, 0], [0, 1], [1, 2]])]
    decode = [("reasoning", (route([[0, 3]]), route([[2, 3]]))), ("answer", (route([[1, 3]]), route([[0, 2]])))]
    events = run_script(p, routers, prefill, decode)
    prompt = events[-1].prompt_experts
    assert prompt.dtype == np.int16 and prompt.shape == (3, 2, 2)
    assert prompt.tolist() == [[[0, 1], [3, 0]], [[1, 2], [0, 1]], [[2, 3], [1, 2]]]
    assert all(e.prompt_experts is prompt for e in events)  # one array, shared, not copied per token

    arr = routed_experts_array(prompt, [e.layers for e in events], [1, 3], 2)
    assert arr.dtype == np.int16 and arr.shape == (3 + len(events) - 1, 2, 2)  # prompt + generated - 1
    assert arr[2].tolist() == [r.experts for r in events[0].layers]  # event 0 routed the last prompt token
    for i, e in enumerate(events[1:], start=1):
        assert arr[3 + i - 1].tolist() == [r.experts for r in e.layers]
    # the page's recorded tuples give the same array; without the prompt the rows start at its last token
    tuples = [[(r.layer, r.experts, r.weights) for r in e.layers] for e in events]
    assert np.array_equal(routed_experts_array(prompt, tuples, [1, 3], 2), arr)
    assert np.array_equal(routed_experts_array(None, tuples, [1, 3], 2), arr[2:])
    # a layer a route does not name is -1
    partial = routed_experts_array(None, [[(3, [1, 2], [0.5, 0.5])]], [1, 3], 2)
    assert partial.tolist() == [[[-1, -1], [1, 2]]]


def test_a_hand_built_stream_has_no_prompt_experts():
    assert Routing(0, "a", "answer", [], {"layers": [0], "top_k": 1}).prompt_experts is None


def test_counts_without_the_new_fields_still_give_every_key():
    from autoglm_app.events import ExpertCounts

    counts = ExpertCounts([0], 2, 1, {"prefill": 1, "decode": 0}, np.array([[1, 0]]), np.zeros((1, 2), np.int64),
                          {"text": np.array([[1, 0]])}, np.zeros(1, np.int64))
    load = expert_load(counts)
    assert load["balancedness"] == {"all": [0.5]} and load["dead_fraction"] == {"all": [0.5]}
    assert load["by_phase"] == {} and load["window_tokens"] == {} and load["diversity"] == [0.5]


def test_a_batched_steps_routes_counted_in_groups_equal_a_count_from_scratch():
    """fold_step (the batched decode step's route) counts its tokens when the counts are read or 64 wait: read at
    uneven intervals (1 to 150 tokens, past PENDING_MAX and past the 1,000-token window), with the phase changing,
    every figure equals a count from scratch of the tokens so far."""
    rng = np.random.default_rng(1)
    E, k, L = 6, 2, 2
    p, routers = make_probe(E, k)
    prefill_n = 30
    picks = [np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(1400)]  # (layers, k) each
    with p:
        p.modality = torch.zeros(prefill_n, dtype=torch.long)
        forward(routers, [route([list(t[layer]) for t in picks[:prefill_n]]) for layer in range(L)])
        p.collect()
    phases = []
    i, reads = prefill_n, 0
    while i < len(picks):
        for _ in range(int(rng.integers(1, 150))):
            if i == len(picks):
                break
            phase = "reasoning" if (i // 97) % 2 else "answer"
            p.start_decode(phase)
            p.fold_step(picks[i], np.full((L, k), 0.5, np.float32))
            phases.append(phase)
            i += 1
        c = p.counts()
        reads += 1
        seq = np.stack(picks[:i])  # (tokens, layers, k)
        decode = seq[prefill_n:]

        def load(tokens):
            out = np.zeros((L, E), np.int64)
            for t in tokens:
                for layer in range(L):
                    out[layer, t[layer]] += 1
            return out

        np.testing.assert_array_equal(c.decode, load(decode))
        for phase in ("reasoning", "answer"):
            np.testing.assert_array_equal(c.by_phase[phase], load([t for t, ph in zip(decode, phases) if ph == phase]))
        for w in (10, 100, 1000):
            np.testing.assert_array_equal(c.windows[w], load(seq[-w:]))
        assert c.tokens == {"prefill": prefill_n, "decode": i - prefill_n}
    assert reads > 10
