"""Pure rendering: engine records -> values the Gradio components show.

Nothing here touches Gradio state, the engine or the model. Inputs are plain data
(numpy maps, PIL images, the routing ``load`` dict, ``Stats``); outputs are PIL
images, HTML / Markdown strings and the (text, label) lists ``gr.HighlightedText``
takes. Everything is cheap enough to run a few times a second while a turn streams.
"""

from __future__ import annotations

import html
import math

import numpy as np
from PIL import Image

from .words import Word

COLORMAPS = ("inferno", "viridis", "magma", "jet", "turbo", "hot")
AGGREGATIONS = ("default", "mean", "max")  # "default" = the maps the engine aggregated itself
DISPLAY_MAX_SIDE = 448  # overlays are for looking at, not for analysis

# ----------------------------------------------------------------------------- focus maps


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a flat map becomes all zeros (nothing stands out)."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo < 1e-12:
        return np.zeros_like(heat)
    return (heat - lo) / (hi - lo)


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """[0, 1] values (...,) -> uint8 RGB (..., 3) through a matplotlib colour map."""
    from matplotlib import colormaps

    cmap = colormaps[colormap if colormap in colormaps else "inferno"]
    return (cmap(np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, colormap: str = "inferno",
                    opacity: float = 0.55) -> Image.Image:
    """The image with a (rows, cols) focus map laid over it.

    The map covers the whole image (the processor resizes, it does not crop). Opacity
    scales with the map's strength so unattended regions keep the picture visible.
    """
    base = image.convert("RGB")
    if max(base.size) > DISPLAY_MAX_SIDE:
        base.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.LANCZOS)
    h = normalise(heat)
    up = Image.fromarray((h * 255).astype(np.uint8)).resize(base.size, Image.BICUBIC)
    up = np.asarray(up, dtype=np.float32) / 255.0
    alpha = (float(np.clip(opacity, 0.0, 1.0)) * (0.25 + 0.75 * up))[..., None]
    mixed = np.asarray(base, np.float32) * (1 - alpha) + colorize(up, colormap).astype(np.float32) * alpha
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib Figure (Agg, no pyplot state) to a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def audio_focus_image(samples: np.ndarray, sample_rate: int, focus: np.ndarray | None,
                      colormap: str = "inferno", opacity: float = 0.55, title: str = "") -> Image.Image:
    """A recording's waveform with the focus over its time axis drawn behind it.

    ``focus`` is (frames,) spread evenly over the recording (one frame per ~40 ms).
    """
    from matplotlib.figure import Figure

    x = _mono(samples)
    seconds = max(len(x) / float(sample_rate), 1e-3)
    fig = Figure(figsize=(6.4, 1.9), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if focus is not None and np.size(focus):
        strip = normalise(np.asarray(focus, np.float32))[None, :]
        ax.imshow(strip, aspect="auto", cmap=colormap, extent=(0, seconds, -1.05, 1.05),
                  alpha=float(np.clip(opacity, 0.05, 1.0)), vmin=0, vmax=1, interpolation="nearest")
    t, lo, hi = _envelope(x, seconds, bins=800)
    ax.fill_between(t, lo, hi, color="#1f2937", linewidth=0)
    ax.set_xlim(0, seconds)
    ax.set_ylim(-1.05, 1.05)
    ax.set_yticks([])
    ax.set_xlabel("seconds", fontsize=8)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout(pad=0.4)
    return figure_to_image(fig)


def _mono(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] <= x.shape[0] else x.mean(axis=0)
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x


def _envelope(x: np.ndarray, seconds: float, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max per time bin: a waveform that draws fast at any length."""
    if x.size == 0:
        return np.array([0.0, seconds]), np.zeros(2), np.zeros(2)
    bins = max(1, min(bins, x.size))
    edges = np.linspace(0, x.size, bins + 1).astype(int)
    lo = np.array([x[a:max(b, a + 1)].min() for a, b in zip(edges[:-1], edges[1:])])
    hi = np.array([x[a:max(b, a + 1)].max() for a, b in zip(edges[:-1], edges[1:])])
    return np.linspace(0, seconds, bins), lo, hi


# ----------------------------------------------------------------------------- words


def word_chips(words: list[Word], selected: int | None) -> list[tuple[str, str]]:
    """Words -> ``gr.HighlightedText`` value; the selected one gets its own colour."""
    chips = []
    for i, w in enumerate(words):
        label = "selected" if i == selected else w.phase
        chips.append((" ".join(w.text.split()) + " ", label))
    return chips


WORD_COLORS = {"reasoning": "#e5e7eb", "answer": "#c7d2fe", "selected": "#fb923c"}

# ----------------------------------------------------------------------------- routing

LOAD_VIEWS = ("total", "prefill", "decode", "text", "image", "audio")


def _cell_color(share: float) -> str:
    """0..1 -> a white-to-indigo background."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (int(255 + (t - 255) * share) for t in (67, 56, 202))
    return f"rgb({r},{g},{b})"


def load_matrix(load: dict, view: str) -> list[list[int]]:
    if view in ("text", "image", "audio"):
        return load.get("by_modality", {}).get(view, [])
    return load.get(view, [])


def routing_heatmap_html(load: dict | None, view: str = "total",
                         token_routes: list[tuple[int, list[int], list[float]]] | None = None,
                         token_label: str = "") -> str:
    """Layer x expert load as an HTML heatmap, with the balance figures per layer.

    Cells are shaded by the expert's share of that layer's routed tokens; the experts
    chosen for the selected token are outlined and show their gate weight.
    """
    if not load:
        return placeholder_html("Expert routing appears here while the model answers: how many tokens each "
                                "expert took per layer, balance figures, and the experts the selected word used.")
    matrix = np.asarray(load_matrix(load, view), dtype=np.float64)
    layers, E = load.get("layers", []), int(load.get("experts", 0))
    if matrix.size == 0:
        matrix = np.zeros((len(layers), E))
    chosen = {layer: dict(zip(experts, weights)) for layer, experts, weights in (token_routes or [])}
    head = "".join(f"<th>E{e}</th>" for e in range(E))
    rows = []
    for r, layer in enumerate(layers):
        counts = matrix[r] if r < len(matrix) else np.zeros(E)
        total = counts.sum()
        cells = []
        for e in range(E):
            share = counts[e] / total if total else 0.0
            gate = chosen.get(layer, {}).get(e)
            mark = f"<sup>{gate:.2f}</sup>" if gate is not None else ""
            cls = ' class="chosen"' if gate is not None else ""
            color = "#fff" if share > 0.55 else "#111"
            cells.append(f'<td{cls} style="background:{_cell_color(share * E / 2)};color:{color}" '
                         f'title="layer {layer}, expert {e}: {int(counts[e])} tokens ({share:.0%})">'
                         f"{int(counts[e])}{mark}</td>")
        cv = _at(load.get("cv"), r)
        ent = _at(load.get("entropy"), r)
        dropped = _at(load.get("dropped"), r)
        rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}<td class='fig'>{cv:.2f}</td>"
                    f"<td class='fig'>{ent:.2f}</td><td class='fig'>{int(dropped)}</td></tr>")
    tokens = load.get("tokens", {})
    caption = (f"{view} load · top-{load.get('top_k', '?')} of {E} experts · tokens routed: "
               f"prefill {tokens.get('prefill', 0)}, decode {tokens.get('decode', 0)}")
    if token_label:
        caption += f" · outlined: experts for {html.escape(token_label)} (gate weight)"
    return (f'<div class="routing"><table class="heat"><caption>{caption}</caption>'
            f"<tr><th>layer</th>{head}<th title='coefficient of variation of expert load (0 = even)'>CV</th>"
            f"<th title='normalised entropy of expert load (1 = even)'>entropy</th><th>dropped</th></tr>"
            f"{''.join(rows)}</table></div>")


def _at(values, i: int, default: float = 0.0) -> float:
    try:
        return float(values[i])
    except (TypeError, IndexError):
        return default


MODALITY_COLORS = {"text": "#6366f1", "image": "#f59e0b", "audio": "#10b981"}


def modality_split_html(load: dict | None) -> str:
    """Per expert (summed over layers): which modality its tokens came from, as stacked bars;
    plus prefill vs decode totals."""
    if not load:
        return ""
    E = int(load.get("experts", 0))
    by = {m: np.asarray(v, np.float64).sum(0) if np.size(v) else np.zeros(E)
          for m, v in load.get("by_modality", {}).items()}
    pre = np.asarray(load.get("prefill", []), np.float64)
    dec = np.asarray(load.get("decode", []), np.float64)
    pre_e = pre.sum(0) if pre.size else np.zeros(E)
    dec_e = dec.sum(0) if dec.size else np.zeros(E)
    peak = max(float(sum(by[m][e] for m in by)) for e in range(E)) if E and by else 0.0
    rows = []
    for e in range(E):
        segs = []
        for m, color in MODALITY_COLORS.items():
            n = float(by.get(m, np.zeros(E))[e]) if m in by else 0.0
            if n > 0 and peak > 0:
                segs.append(f'<span style="width:{100 * n / peak:.1f}%;background:{color}" '
                            f'title="{m}: {int(n)}"></span>')
        rows.append(f"<tr><th>E{e}</th><td class='bar'>{''.join(segs)}</td>"
                    f"<td class='fig'>{int(pre_e[e])}</td><td class='fig'>{int(dec_e[e])}</td></tr>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{m}' for m, c in MODALITY_COLORS.items())
    return (f'<div class="routing"><table class="split"><caption>tokens per expert by modality '
            f"(all layers) · {legend}</caption><tr><th>expert</th><th>modality split</th><th>prefill</th>"
            f"<th>decode</th></tr>{''.join(rows)}</table></div>")


def token_routes_html(routes: list[tuple[int, list[int], list[float]]], label: str) -> str:
    """The experts one token went to at every layer, with gate-weight bars."""
    if not routes:
        return ""
    rows = []
    for layer, experts, weights in routes:
        parts = "".join(f'<span class="gate"><b>E{e}</b><i style="width:{60 * w:.0f}px"></i>{w:.2f}</span>'
                        for e, w in zip(experts, weights))
        rows.append(f"<tr><th>L{layer}</th><td>{parts}</td></tr>")
    return (f'<div class="routing"><table class="token"><caption>experts chosen for {html.escape(label)}'
            f"</caption>{''.join(rows)}</table></div>")


def focus_caption_html(label: str, captions: list[str], has_media: bool, running: bool) -> str:
    """The line above the heatmap: whose focus it is and how much attention went where."""
    if not has_media:
        return placeholder_html("This turn has no image or recording, so there is no focus to show. "
                                "Click a word of the reply to see its experts in the Routing tab.")
    if not label:
        return placeholder_html("Waiting for the first token…" if running else "The model produced no tokens.")
    parts = [f"<b>Focus of {html.escape(label)}</b>", *map(html.escape, captions), "bright = more attention"]
    return f'<div class="caption">{" · ".join(parts)}</div>'


def placeholder_html(text: str) -> str:
    return f'<div class="placeholder">{html.escape(text)}</div>'


def unavailable_html(what: str, reason: str | None) -> str:
    """A panel the backend cannot fill (a remote server exposes no attention or routers): say why."""
    text = f"{what} needs the in-process engine, and this server forwards to a remote model."
    reason = (reason or "").strip()
    if reason:
        text += f" ({reason[:1].upper()}{reason[1:]}.)"
    text += " Start AutoGLM Studio without --backend openai to see it; chat works as usual."
    return placeholder_html(text)


# ----------------------------------------------------------------------------- model panel


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _seconds(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f} s"


def device_map_rows(device_map) -> list[tuple[str, int]]:
    """A module -> device map as (device, number of modules) rows."""
    if not device_map:
        return []
    if isinstance(device_map, str):
        return [(device_map, 0)]
    counts: dict[str, int] = {}
    for dev in dict(device_map).values():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items())


def is_remote(info: dict) -> bool:
    """The engine forwards to another server (``--backend openai``): no local weights, devices or probes."""
    return info.get("backend") not in (None, "local", "in-process")


def model_markdown(info: dict, memory: dict[str, int], stats=None) -> str:
    """The Model panel: identity, quantization, devices with memory, last answer's speed, module table.

    For a remote backend: the backend, its base URL and what is not available instead of devices / modules.
    """
    if is_remote(info):
        name = info.get("model_id")
        lines = [f"### {'`' + name + '`' if name and name != info.get('base_url') else 'Remote model'}",
                 "| property | value |", "|---|---|",
                 f"| backend | {info.get('backend')} (remote OpenAI-compatible server) |",
                 f"| base URL | `{info.get('base_url', '–')}` |",
                 f"| context | {info.get('context_limit', '–')} tokens |",
                 f"| speech | {_speech(info)} |"]
        if info.get("focus") is False or info.get("routing") is False:
            reason = (info.get("reason") or "they need the in-process engine").strip().rstrip(".")
            lines += ["", f"*Focus and routing are not available: {reason}.*"]
        lines.append("")
        lines += _last_answer(stats)
        return "\n".join(lines)
    lines = [f"### {info.get('model_id', 'model')}",
             "| property | value |", "|---|---|",
             f"| family | {info.get('family', '–')} |",
             f"| weights | {info.get('quantize') or '–'} |",
             f"| attention | {info.get('attention', '–')} |",
             f"| context | {info.get('context_limit', '–')} tokens |",
             f"| speech | {_speech(info)} |",
             "", "#### Devices", "| device | modules placed | memory in use |", "|---|---|---|"]
    placed = dict(device_map_rows(info.get("device_map")))
    everything = "all" if not info.get("device_map") else "–"
    for dev, used in memory.items():
        lines.append(f"| {dev} | {placed.pop(dev, everything)} | {human_bytes(used)} |")
    for dev, n in placed.items():
        lines.append(f"| {dev} | {n} | – |")
    lines.append("")
    lines += _last_answer(stats)
    summary = (info.get("summary") or "").strip()
    if summary:
        lines += ["", "#### Modules", "```text", summary, "```"]
    return "\n".join(lines)


def _speech(info: dict) -> str:
    if info.get("hears_audio", True):
        return "the model hears recordings"
    if info.get("can_transcribe"):
        return "recordings are transcribed to text (speech-to-text model)"
    return "not supported: type the question"


def _last_answer(stats) -> list[str]:
    lines = ["#### Last answer"]
    if stats is None:
        lines.append("*No answer yet: send a message and its speed shows here.*")
    else:
        lines += ["| figure | value |", "|---|---|",
                  f"| time to first token | {_seconds(stats.ttft_s)} |",
                  f"| time to end of thinking | {_seconds(stats.think_s)} |",
                  f"| tokens / s (all) | {stats.tokens_per_second:.1f} |",
                  f"| reasoning tokens / s | {stats.reasoning_tps:.1f} ({stats.reasoning_tokens} tokens) |",
                  f"| answer tokens / s | {stats.answer_tps:.1f} ({stats.answer_tokens} tokens) |",
                  f"| prompt tokens | {stats.prompt_tokens} |",
                  f"| waited in queue | {_seconds(stats.queue_s)} |",
                  f"| total | {_seconds(stats.total_s)} |",
                  f"| finish | {stats.finish_reason} |",
                  f"| focus computed by | {stats.attention} |"]
        if stats.peak_memory:
            lines.append("| peak memory | " + ", ".join(f"{d}: {human_bytes(b)}" for d, b in stats.peak_memory.items())
                         + " |")
    return lines
