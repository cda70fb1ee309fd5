"""The routing figures (ui/figures.py): values equal the load's shares, the selected token's experts are
marked, balance figures are the selected view's, empty views say so; cheap at 48 layers x 128 experts."""

from __future__ import annotations

import base64
import json
import math
import time

import numpy as np
import pytest

from autoglm_app.ui import figures


def small_load() -> dict:
    return {"layers": [0, 1], "experts": 4, "top_k": 2, "tokens": {"prefill": 20, "decode": 3},
            "prefill": [[10, 10, 10, 10], [20, 5, 10, 5]], "decode": [[3, 3, 0, 0], [0, 3, 3, 0]],
            "total": [[13, 13, 10, 10], [20, 8, 13, 5]],
            "by_modality": {"text": [[4, 4, 2, 2], [6, 2, 2, 2]], "image": [[6, 6, 8, 8], [14, 3, 8, 3]],
                            "audio": [[0, 0, 0, 0], [0, 0, 0, 0]]},
            "dropped": [0, 1], "cv": [0.1, 0.4], "entropy": [0.99, 0.8]}


def big_load(layers: int = 48, experts: int = 128, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pre = rng.integers(0, 60, (layers, experts))
    dec = rng.integers(0, 6, (layers, experts))
    text = pre // 3 + dec
    return {"layers": list(range(layers)), "experts": experts, "top_k": 8,
            "tokens": {"prefill": int(pre.sum() // 8 // layers), "decode": int(dec.sum() // 8 // layers)},
            "prefill": pre.tolist(), "decode": dec.tolist(), "total": (pre + dec).tolist(),
            "by_modality": {"text": text.tolist(), "image": (pre + dec - text).tolist(),
                            "audio": np.zeros((layers, experts), int).tolist()},
            "dropped": [0] * layers}


def plotted(fig) -> list[dict]:
    """The traces as the browser gets them (typed arrays decoded)."""
    out = []
    for t in json.loads(fig.to_json())["data"]:
        t = dict(t)
        for k, v in t.items():
            if isinstance(v, dict) and "bdata" in v:
                arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
                t[k] = arr.reshape([int(s) for s in str(v["shape"]).split(",")]) if "shape" in v else arr
        out.append(t)
    return out


@pytest.mark.parametrize("view", ["total", "prefill", "decode", "text", "image"])
def test_heatmap_cells_are_the_views_shares(view):
    load = small_load()
    heat = plotted(figures.routing_figure(load, view))[0]
    m = np.asarray(figures.view_counts(load, view), float)
    np.testing.assert_allclose(np.asarray(heat["z"]), m / m.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(heat["customdata"]), m)  # hover: choices
    assert "share" in heat["hovertemplate"] and "expert" in heat["hovertemplate"]


def test_selected_tokens_experts_are_marked_with_their_gate_weights():
    fig = figures.routing_figure(small_load(), "total", [(0, [1, 2], [0.7, 0.3]), (1, [0, 3], [0.6, 0.4])], "“cat”")
    heat, marks = plotted(fig)
    assert list(np.asarray(marks["x"])) == [1, 2, 0, 3] and list(np.asarray(marks["y"])) == [0, 0, 1, 1]
    custom = np.asarray(marks["customdata"])
    np.testing.assert_allclose(custom[:, 2], [0.7, 0.3, 0.6, 0.4])  # gate weight in the hover
    np.testing.assert_allclose(custom[:, 1], [13 / 46, 10 / 46, 20 / 46, 5 / 46])  # share
    assert marks["marker"]["symbol"] == "square-open" and "gate weight" in marks["hovertemplate"]
    assert "cat" in fig.layout.title.text
    assert len(figures.routing_figure(small_load(), "total").data) == 1  # nothing selected: no marks


def test_layer_and_expert_ranges_look_closer():
    load = big_load()
    routes = [(5, [3, 100], [0.5, 0.5]), (20, [10, 11], [0.6, 0.4])]
    heat, marks = plotted(figures.routing_figure(load, "total", routes, "x", layer_range=(4, 12), expert_range=(0, 16)))
    z = np.asarray(heat["z"])
    assert z.shape == (8, 16) and list(np.asarray(heat["y"])) == list(range(4, 12))
    full = np.asarray(load["total"], float)
    np.testing.assert_allclose(z, (full / full.sum(1, keepdims=True))[4:12, :16])  # share of the whole layer
    assert list(np.asarray(marks["x"])) == [3] and list(np.asarray(marks["y"])) == [5]  # only marks inside
    assert figures.clamp_range((90, 500), 48) == (47, 48) and figures.clamp_range(None, 4) == (0, 4)


def test_view_balance_is_the_selected_views_by_hand():
    load = small_load()
    b = figures.view_balance(load, "decode")
    rows = [[3, 3, 0, 0], [0, 3, 3, 0]]
    for r, row in enumerate(rows):
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 4)
        assert b["cv"][r] == pytest.approx(std / mean)  # = 1.0, while the total's first row is 0.13
        p = [x / sum(row) for x in row if x]
        assert b["entropy"][r] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))  # = 0.5
    assert b["dropped"] is None and b["routed"] == 12  # dropped is recorded for the total only
    total = figures.view_balance(load, "total")
    assert total["dropped"] == [0, 1] and total["cv"][0] == pytest.approx(np.std([13, 13, 10, 10]) / 11.5)
    load["dropped_by_view"] = {"decode": [2, 0]}
    assert figures.view_balance(load, "decode")["dropped"] == [2, 0]
    assert "not recorded for this view" in figures.balance_html(small_load(), "image")
    assert "not recorded" not in figures.balance_html(small_load(), "total")
    fig = figures.balance_figure(small_load(), "decode")
    np.testing.assert_allclose(plotted(fig)[0]["y"], b["cv"])
    assert "not recorded for this view" in fig.layout.title.text


def test_an_empty_view_says_so_instead_of_drawing_zeros():
    load = small_load()
    assert figures.routing_figure(load, "audio") is None and figures.balance_figure(load, "audio") is None
    assert "no audio tokens" in figures.empty_view_message(load, "audio")
    assert "no audio tokens" in figures.balance_html(load, "audio")
    assert figures.empty_view_message(load, "image") is None
    load["decode"] = [[0] * 4, [0] * 4]
    assert "No generated token" in figures.empty_view_message(load, "decode")
    assert "placeholder" in figures.empty_view_message(None, "total") and figures.routing_figure(None) is None


def test_modality_chart_stacks_tokens_per_expert_over_layers():
    load = big_load()
    traces = plotted(figures.modality_figure(load))
    assert [t["name"] for t in traces] == ["text", "image"]  # no audio in this turn: no empty series
    for t in traces:
        np.testing.assert_array_equal(np.asarray(t["y"]), np.asarray(load["by_modality"][t["name"]]).sum(0))
        assert len(np.asarray(t["x"])) == 128
    assert figures.modality_figure(load).layout.barmode == "stack"
    assert len(np.asarray(plotted(figures.modality_figure(load, (64, 96)))[0]["x"])) == 32
    assert figures.modality_figure(None) is None


def test_figures_stay_cheap_at_48_layers_by_128_experts():
    load = big_load()
    routes = [(layer, list(range(layer % 120, layer % 120 + 8)), [0.125] * 8) for layer in range(48)]
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        figures.routing_figure(load, "total", routes, "x").to_json()
        figures.modality_figure(load).to_json()
        best = min(best, time.perf_counter() - t0)
    assert best < 0.1, best  # ~6 ms measured; generous for a loaded CI machine
