"""Routing panels as plotly figures that stay readable and cheap at real-model scale (48 layers x 128 experts).

Pure like ``render``: the routing ``load`` dict (``events.expert_load``) in, a ``plotly.graph_objects.Figure``
(for ``gr.Plot``) or an HTML message out. Figures are built from plain dicts with plotly's validation off
(``_validate=False``): about 1 ms for the 48 x 128 heatmap, and ``fig.to_json()`` (what ``gr.Plot`` does
with it) about 2 ms more. Hover and zoom come from plotly.js, which Gradio bundles (works offline).

Ranges (``layer_range``, ``expert_range``) are [start, end) positions, like the focus layer sliders:
layer positions index ``load["layers"]`` (the MoE layers, in order), expert positions the experts.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..events import balance_cv_rows, balance_entropy_rows
from .render import MODALITY_COLORS, load_matrix, placeholder_html

VIEW_WORDS = {"total": "all routed", "prefill": "prompt (prefill)", "decode": "generated (decode)",
              "text": "text", "image": "image", "audio": "audio"}
HEAT_SCALE = [[0.0, "#ffffff"], [0.35, "#a5b4fc"], [0.7, "#4338ca"], [1.0, "#1e1b4b"]]
MARK_COLOR = "#f97316"  # the selected token's experts: the word chips' "selected" orange
FONT = {"size": 11}
# a small fixed template: plotly's default one is deep-copied into every figure (~15 ms each)
TEMPLATE = {"layout": {"paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
                       "colorway": ["#4338ca", "#10b981", "#f59e0b", "#ef4444"]}}


def clamp_range(rng: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """A [start, end) range fitted inside 0..n (at least one item when n > 0); None = everything."""
    if rng is None or n < 1:
        return 0, max(n, 0)
    start = min(max(int(rng[0]), 0), n - 1)
    end = min(max(int(rng[1]), start + 1), n)
    return start, end


def view_counts(load: dict, view: str) -> np.ndarray:
    """The view's (layers, experts) count matrix as int64; zeros when the load does not have it."""
    n, E = len(load.get("layers", [])), int(load.get("experts", 0))
    m = np.asarray(load_matrix(load, view), dtype=np.int64)
    if m.ndim != 2 or m.shape != (n, E):
        fixed = np.zeros((n, E), np.int64)
        if m.ndim == 2:
            r, c = min(n, m.shape[0]), min(E, m.shape[1])
            fixed[:r, :c] = m[:r, :c]
        return fixed
    return m


def view_shares(counts: np.ndarray) -> np.ndarray:
    """Each expert's share of its layer's routed choices (rows sum to 1; an empty row stays 0)."""
    totals = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(totals, 1)


def view_dropped(load: dict, view: str) -> list[int] | None:
    """Dropped choices per layer for ``view``, where the load records them: ``dropped`` is the whole
    request's ("total"); a load may add ``dropped_by_view`` {view: per layer}. Otherwise None."""
    per_view = load.get("dropped_by_view") or {}
    values = per_view.get(view)
    if values is None and view == "total":
        values = load.get("dropped")
    if values is None or len(values) != len(load.get("layers", [])):
        return None
    return [int(v) for v in values]


def view_balance(load: dict, view: str) -> dict:
    """Balance figures of the SELECTED view's matrix, per layer.

    {"view", "routed" (choices in the view), "cv" (coefficient of variation, 0 = even), "entropy"
    (normalised, 1 = even), "dropped" (per layer, or None = not recorded for this view)}.
    """
    counts = view_counts(load, view)
    E = counts.shape[1]
    empty = counts.shape[0] == 0 or E == 0
    return {"view": view,
            "routed": int(counts.sum()),
            "cv": [] if empty else balance_cv_rows(counts),
            "entropy": [] if empty else balance_entropy_rows(counts),
            "dropped": view_dropped(load, view)}


def empty_view_message(load: dict | None, view: str) -> str | None:
    """The HTML to show instead of a figure (no load yet, or nothing routed in this view), else None."""
    if not load:
        return placeholder_html("Expert routing appears here while the model answers: how many tokens each "
                                "expert took per layer, balance figures, and the experts the selected word used.")
    if int(view_counts(load, view).sum()) > 0:
        return None
    if view in ("text", "image", "audio"):
        return placeholder_html(f"This turn has no {view} tokens, so the {view} view has nothing to show. "
                                "Pick another view.")
    if view == "decode":
        return placeholder_html("No generated token has been routed yet.")
    return placeholder_html(f"No tokens routed in the {view} view yet.")


def _row_px(rows: int) -> float:
    """Pixels per layer row: 9 at 48 layers, up to 28 when zoomed in to a few."""
    return float(np.clip(400.0 / max(rows, 1), 9, 28))


def _height(rows: int, margins: int) -> int:
    return int(min(max(margins + rows * _row_px(rows), 260), 720))


def routing_figure(load: dict | None, view: str = "total",
                   token_routes: list[tuple[int, list[int], list[float]]] | None = None, token_label: str = "",
                   layer_range: tuple[int, int] | None = None,
                   expert_range: tuple[int, int] | None = None) -> go.Figure | None:
    """Layers x experts heatmap of the view's load: each cell the expert's share of that layer's routed
    choices; the selected token's experts as open orange squares (hover: gate weight). None when
    ``empty_view_message`` has something to say instead.
    """
    if empty_view_message(load, view) is not None:
        return None
    layers, E = list(load.get("layers", [])), int(load.get("experts", 0))
    l0, l1 = clamp_range(layer_range, len(layers))
    e0, e1 = clamp_range(expert_range, E)
    counts = view_counts(load, view)[l0:l1]
    shares = view_shares(counts)[:, e0:e1]
    counts = counts[:, e0:e1]
    ys = np.asarray(layers[l0:l1])  # numeric layer numbers: every array below goes out as a typed array
    xs = np.arange(e0, e1)
    # colour scale: up to the 99.5th percentile (one hot cell does not wash out the rest; hover has the value),
    # at least twice an even share (an even load sits mid-scale, never a saturated sea)
    peak = float(np.percentile(shares, 99.5)) if shares.size else 0.0
    zmax = min(max(peak, 2.0 / max(E, 1)), 1.0)
    data = [{"type": "heatmap", "z": shares, "x": xs, "y": ys, "customdata": counts,
             "zmin": 0.0, "zmax": zmax, "colorscale": HEAT_SCALE, "xgap": 1 if e1 - e0 <= 32 else 0,
             "ygap": 1 if l1 - l0 <= 16 else 0, "name": "load",
             "colorbar": {"title": {"text": "share", "side": "right"}, "tickformat": ".0%", "thickness": 12,
                          "len": 0.9},
             "hovertemplate": "layer %{y} · expert %{x}<br>%{customdata} choices · share %{z:.1%}<extra></extra>"}]
    pos = {n: i for i, n in enumerate(layers[l0:l1])}
    marks = [(pos[layer], e, w) for layer, experts, weights in token_routes or [] if layer in pos
             for e, w in zip(experts, weights) if e0 <= e < e1]
    if marks:
        rows_, es, gates = (np.asarray(v) for v in zip(*marks))
        hover = np.stack([counts[rows_, es - e0], shares[rows_, es - e0], gates], axis=1)
        rows, cols = l1 - l0, e1 - e0
        cell = min((_height(rows, 94) - 94) / rows, 760.0 / cols)  # plot area ~760 px wide on a laptop
        size = float(np.clip(cell * 0.8, 5, 24))
        data.append({"type": "scatter", "x": es, "y": ys[rows_], "customdata": hover, "mode": "markers",
                     "name": token_label or "selected token", "showlegend": False,
                     "marker": {"symbol": "square-open", "size": size, "color": MARK_COLOR,
                                "line": {"width": 2 if size > 7 else 1.5, "color": MARK_COLOR}},
                     "hovertemplate": "layer %{y} · expert %{x}<br>%{customdata[0]} choices · share "
                                      "%{customdata[1]:.1%}<br>gate weight %{customdata[2]:.2f}<extra>chosen</extra>"})
    mx = bool(marks)
    tokens = load.get("tokens", {})
    title = (f"{VIEW_WORDS.get(view, view)} load · top-{load.get('top_k', '?')} of {E} experts · "
             f"prefill {tokens.get('prefill', 0)}, decode {tokens.get('decode', 0)} tokens")
    if mx:
        title += f"<br><span style='color:{MARK_COLOR}'>□</span> experts for {token_label or 'the selected token'}"
    step = float(np.min(np.diff(ys))) if ys.size > 1 else 1.0
    layout = {"height": _height(l1 - l0, 94), "margin": {"l": 48, "r": 16, "t": 54 if mx else 36, "b": 40},
              "title": {"text": title, "x": 0.0, "xanchor": "left", "font": {"size": 12}}, "font": FONT,
              "xaxis": {"title": {"text": "expert"}, "range": [e0 - 0.5, e1 - 0.5], "zeroline": False,
                        "showgrid": False, "dtick": _tick_step(e1 - e0)},
              "yaxis": {"title": {"text": "layer"}, "range": [float(ys[-1]) + step / 2, float(ys[0]) - step / 2],
                        "zeroline": False, "showgrid": False, "dtick": step * _tick_step(l1 - l0)},
              "plot_bgcolor": "#ffffff", "hovermode": "closest", "uirevision": f"routing-{view}",
              "template": TEMPLATE}
    return go.Figure(data=data, layout=layout, _validate=False)


def _tick_step(n: int) -> int:
    for step in (1, 2, 4, 8, 16, 32):
        if n / step <= 24:
            return step
    return 64


def balance_figure(load: dict | None, view: str = "total",
                   layer_range: tuple[int, int] | None = None) -> go.Figure | None:
    """Per-layer balance of the view: CV (left axis), normalised entropy (right axis, 0..1) and, where
    recorded for the view, dropped choices (bars). None when the view is empty (see ``empty_view_message``)."""
    if empty_view_message(load, view) is not None:
        return None
    b = view_balance(load, view)
    layers = list(load.get("layers", []))
    l0, l1 = clamp_range(layer_range, len(layers))
    xs = [f"L{n}" for n in layers[l0:l1]]
    data = [{"type": "scatter", "x": xs, "y": b["cv"][l0:l1], "mode": "lines+markers", "name": "CV (0 = even)",
             "line": {"color": "#4338ca"}, "hovertemplate": "%{x}: CV %{y:.2f}<extra></extra>"},
            {"type": "scatter", "x": xs, "y": b["entropy"][l0:l1], "mode": "lines+markers", "yaxis": "y2",
             "name": "entropy (1 = even)", "line": {"color": "#10b981"},
             "hovertemplate": "%{x}: entropy %{y:.2f}<extra></extra>"}]
    note = "dropped: not recorded for this view"
    if b["dropped"] is not None:
        data.append({"type": "bar", "x": xs, "y": b["dropped"][l0:l1], "name": "dropped", "yaxis": "y3",
                     "marker": {"color": "#ef4444"}, "opacity": 0.5,
                     "hovertemplate": "%{x}: %{y} dropped<extra></extra>"})
        note = f"dropped: {sum(b['dropped'])} in all"
    layout = {"height": 240, "margin": {"l": 48, "r": 48, "t": 36, "b": 36}, "font": FONT,
              "title": {"text": f"balance of the {VIEW_WORDS.get(view, view)} load per layer · {note}",
                        "x": 0.0, "xanchor": "left", "font": {"size": 12}},
              "xaxis": {"type": "category", "dtick": _tick_step(l1 - l0)},
              "yaxis": {"title": {"text": "CV"}, "rangemode": "tozero"},
              "yaxis2": {"title": {"text": "entropy"}, "overlaying": "y", "side": "right", "range": [0, 1.05]},
              "yaxis3": {"overlaying": "y", "visible": False, "rangemode": "tozero"},
              "legend": {"orientation": "h", "y": -0.2}, "uirevision": "balance", "template": TEMPLATE}
    return go.Figure(data=data, layout=layout, _validate=False)


def balance_html(load: dict | None, view: str = "total") -> str:
    """One line of the view's balance: mean / worst CV and entropy, dropped or "not recorded for this view"."""
    message = empty_view_message(load, view)
    if message is not None:
        return message
    b = view_balance(load, view)
    cv, ent = np.asarray(b["cv"]), np.asarray(b["entropy"])
    worst = int(np.argmax(cv)) if cv.size else 0
    layer = load["layers"][worst] if cv.size else "–"
    dropped = ("dropped: not recorded for this view" if b["dropped"] is None
               else f"dropped: {sum(b['dropped'])} choices")
    parts = [f"<b>{VIEW_WORDS.get(view, view)} load</b>", f"{b['routed']} expert choices",
             f"CV mean {cv.mean():.2f}, worst {cv.max():.2f} (L{layer})" if cv.size else "CV –",
             f"entropy mean {ent.mean():.2f}, lowest {ent.min():.2f}" if ent.size else "entropy –", dropped]
    return f'<div class="caption">{" · ".join(parts)}</div>'


def modality_figure(load: dict | None, expert_range: tuple[int, int] | None = None) -> go.Figure | None:
    """Tokens per expert by modality (text / image / audio), summed over layers, as stacked bars; hover
    adds the expert's prefill and decode totals. None without a load."""
    if not load:
        return None
    E = int(load.get("experts", 0))
    e0, e1 = clamp_range(expert_range, E)
    xs = list(range(e0, e1))
    pre = view_counts(load, "prefill").sum(axis=0)[e0:e1]
    dec = view_counts(load, "decode").sum(axis=0)[e0:e1]
    phases = np.stack([pre, dec], axis=1)
    data = []
    for m, color in MODALITY_COLORS.items():
        per_expert = view_counts(load, m).sum(axis=0)[e0:e1]
        if m != "text" and not per_expert.any():
            continue  # no image / audio in this turn: no empty legend entry
        data.append({"type": "bar", "x": xs, "y": per_expert, "name": m, "marker": {"color": color, "line":
                     {"width": 0}}, "customdata": phases,
                     "hovertemplate": f"expert %{{x}} · {m}: %{{y}}<br>prefill %{{customdata[0]}}, "
                                      "decode %{customdata[1]}<extra></extra>"})
    layout = {"barmode": "stack", "bargap": 0.1 if e1 - e0 > 32 else 0.25, "height": 260, "font": FONT,
              "margin": {"l": 48, "r": 16, "t": 36, "b": 40},
              "title": {"text": "tokens per expert by modality (all layers)", "x": 0.0, "xanchor": "left",
                        "font": {"size": 12}},
              "xaxis": {"title": {"text": "expert"}, "range": [e0 - 0.5, e1 - 0.5], "dtick": _tick_step(e1 - e0)},
              "yaxis": {"title": {"text": "choices"}}, "legend": {"orientation": "h", "x": 1, "xanchor": "right",
                                                                 "y": 1.12, "traceorder": "normal"},
              "hovermode": "closest", "uirevision": "modality", "template": TEMPLATE}
    return go.Figure(data=data, layout=layout, _validate=False)
