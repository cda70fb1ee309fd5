"""Pure rendering: engine records -> values the Gradio components show.

Nothing here touches Gradio state, the engine or the model. Inputs are plain data
(numpy maps, PIL images, the routing ``load`` dict, ``Stats``); outputs are PIL
images, HTML / Markdown strings and the (text, label) lists ``gr.HighlightedText``
takes. Everything is cheap enough to run a few times a second while a turn streams.
"""

from __future__ import annotations

import functools
import html
import re
import threading
from collections import OrderedDict

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


@functools.lru_cache(maxsize=None)
def colormap_lut(colormap: str) -> np.ndarray:
    """A colour map's 256-entry uint8 RGB lookup table (read-only, cached per name; unknown names = inferno)."""
    from matplotlib import colormaps

    cmap = colormaps[colormap if colormap in colormaps else "inferno"]
    cmap = cmap if cmap.N == 256 else cmap.resampled(256)
    lut = (cmap(np.arange(256))[:, :3] * 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=None)
def _palette(colormap: str) -> list[int]:
    return colormap_lut(colormap).ravel().tolist()


@functools.lru_cache(maxsize=64)
def _alpha_table(opacity_pct: int) -> list[int]:
    """0..255 map value -> 0..255 blend weight: opacity x (0.25 + 0.75 x value), as ``Image.point`` takes it."""
    o = opacity_pct / 100.0
    return [int(round(255 * o * (0.25 + 0.75 * v / 255.0))) for v in range(256)]


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """[0, 1] values (...,) -> uint8 RGB (..., 3) through the colour map's cached lookup table (the same
    bins as matplotlib: value x 256, clipped to 255); uint8 input is taken as an index already."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return colormap_lut(colormap)[values]
    idx = np.clip(values, 0.0, 1.0) * 256.0
    return colormap_lut(colormap)[np.minimum(idx.astype(np.intp), 255)]


_BASE_CACHE: OrderedDict[tuple, tuple[Image.Image, Image.Image]] = OrderedDict()
_BASE_LOCK = threading.Lock()


def display_base(image: Image.Image) -> Image.Image:
    """The image as RGB, at most DISPLAY_MAX_SIDE on its long side; the last few are cached (a 1920x1080
    photo costs ~10 ms to shrink, and the page redraws the same picture several times a second). The cache
    holds the image itself, so its id cannot be reused while the entry lives."""
    key = (id(image), image.size, image.mode)
    with _BASE_LOCK:
        hit = _BASE_CACHE.get(key)
        if hit is not None and hit[0] is image:
            _BASE_CACHE.move_to_end(key)
            return hit[1]
    base = image if image.mode == "RGB" else image.convert("RGB")
    if max(base.size) > DISPLAY_MAX_SIDE:
        scale = DISPLAY_MAX_SIDE / max(base.size)
        size = (max(1, round(base.width * scale)), max(1, round(base.height * scale)))
        base = base.resize(size, Image.LANCZOS, reducing_gap=1.0)  # box-reduce first: ~4x faster
    elif base is image:
        base = image.copy()
    with _BASE_LOCK:
        _BASE_CACHE[key] = (image, base)
        while len(_BASE_CACHE) > 8:
            _BASE_CACHE.popitem(last=False)
    return base


def overlay_heatmap(image: Image.Image, heat: np.ndarray, colormap: str = "inferno",
                    opacity: float = 0.55) -> Image.Image:
    """The image with a (rows, cols) focus map laid over it, at most DISPLAY_MAX_SIDE on its long side.

    The map covers the whole image (the processor resizes, it does not crop). Opacity
    scales with the map's strength so unattended regions keep the picture visible. All per-pixel work is
    Pillow's C code on uint8 planes (upscale, palette lookup, blend): ~2 ms for a 45 x 60 map on a photo.
    """
    base = display_base(image)
    up = Image.fromarray((normalise(heat) * 255).astype(np.uint8)).resize(base.size, Image.BICUBIC)
    mask = up.point(_alpha_table(int(round(100 * float(np.clip(opacity, 0.0, 1.0))))))
    colour = up.copy()
    colour.putpalette(_palette(colormap))
    return Image.composite(colour.convert("RGB"), base, mask)


AUDIO_SIZE = (640, 190)  # width, height of the recording's focus picture
_INK, _AXIS = (31, 41, 55), (107, 114, 128)


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def audio_focus_image(samples: np.ndarray, sample_rate: int, focus: np.ndarray | None,
                      colormap: str = "inferno", opacity: float = 0.55, title: str = "") -> Image.Image:
    """A recording's waveform with the focus over its time axis drawn behind it (AUDIO_SIZE pixels).

    ``focus`` is (frames,) spread evenly over the recording (one frame per ~40 ms). Drawn with numpy and
    Pillow (the strip through the colour map's lookup table, the min/max envelope one pixel column at a
    time): a few ms, where a matplotlib figure cost ~150 ms.
    """
    from PIL import ImageDraw

    W, H = AUDIO_SIZE
    left, right, top, bottom = 10, 10, 22 if title else 8, 34
    pw, ph = W - left - right, H - top - bottom
    x = _mono(samples)
    seconds = max(len(x) / float(sample_rate), 1e-3)
    canvas = np.full((H, W, 3), 255, np.uint8)
    plot = canvas[top:top + ph, left:left + pw]
    if focus is not None and np.size(focus):
        strip = (normalise(np.asarray(focus, np.float32).ravel()) * 255).astype(np.uint8)
        cols = strip[np.minimum((np.arange(pw) * strip.size) // pw, strip.size - 1)]
        a = float(np.clip(opacity, 0.05, 1.0))
        tinted = (colormap_lut(colormap)[cols].astype(np.float32) * a + 255.0 * (1 - a)).astype(np.uint8)
        plot[:] = tinted[None, :, :]
    lo, hi = _envelope(x, pw)
    rows = np.arange(ph, dtype=np.float32)[:, None]
    y_of = lambda v: (1.05 - v) / 2.1 * (ph - 1)  # noqa: E731  (-1.05..1.05 -> bottom..top)
    ink = (rows >= np.floor(y_of(hi))[None, :]) & (rows <= np.ceil(y_of(lo))[None, :])
    plot[ink] = _INK
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + pw, top + ph), outline=_AXIS)
    font = _font(11)
    step = _nice_step(seconds)
    for k in range(int(seconds / step) + 1):
        t = k * step
        px = left + round(t / seconds * (pw - 1))
        draw.line((px, top + ph, px, top + ph + 4), fill=_AXIS)
        label = f"{t:g}"
        draw.text((px, top + ph + 6), label, fill=_INK, font=font, anchor="ma")
    draw.text((left + pw // 2, H - 2), "seconds", fill=_INK, font=font, anchor="md")
    if title:
        draw.text((left, 4), title, fill=_INK, font=_font(12))
    return image


def _nice_step(seconds: float) -> float:
    """A tick spacing that gives at most ~10 ticks: 0.1, 0.2, 0.5, 1, 2, 5, 10 ... seconds."""
    for step in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300):
        if seconds / step <= 10:
            return step
    return 600.0


def _mono(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] <= x.shape[0] else x.mean(axis=0)
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x


def _envelope(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Min/max per time bin (one bin per pixel column): a waveform that draws fast at any length."""
    bins = max(1, bins)
    if x.size == 0:
        return np.zeros(bins, np.float32), np.zeros(bins, np.float32)
    starts = (np.arange(bins) * x.size) // bins
    if x.size < bins:  # fewer samples than columns: repeat each
        return x[starts], x[starts]
    return np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)


# ----------------------------------------------------------------------------- words


# how sure the model was of a word, in four bands (a word's probability: that of its least likely token)
PROBABILITY_BANDS = ((0.9, "p ≥ 90%"), (0.5, "p 50–90%"), (0.2, "p 20–50%"), (0.0, "p < 20%"))


def probability_band(p: float) -> str:
    return next(label for floor, label in PROBABILITY_BANDS if p >= floor)


def word_chips(words: list[Word], selected: int | None,
               probabilities: list[float | None] | None = None) -> list[tuple[str, str]]:
    """Words -> ``gr.HighlightedText`` value; the selected one gets its own colour. With ``probabilities`` (one per
    word, None where unknown) each word is coloured by its band instead of its phase."""
    chips = []
    for i, w in enumerate(words):
        p = probabilities[i] if probabilities is not None else None
        label = "selected" if i == selected else (probability_band(p) if p is not None else w.phase)
        chips.append((" ".join(w.text.split()) + " ", label))
    return chips


WORD_COLORS = {"reasoning": "#e5e7eb", "answer": "#c7d2fe", "selected": "#fb923c",
               "p ≥ 90%": "#bbf7d0", "p 50–90%": "#fef08a", "p 20–50%": "#fdba74", "p < 20%": "#fca5a5"}


def probability_legend_html() -> str:
    swatches = "".join(f'<span class="chip" style="background:{WORD_COLORS[label]}">{html.escape(label)}</span> '
                       for _, label in PROBABILITY_BANDS)
    return (f'<div class="caption">How sure the model was of each word (its least likely token): {swatches}'
            "</div>")


def percent(p: float) -> str:
    """A probability for people: one decimal, or two significant digits below 0.1% (never a bare "0.0%")."""
    return f"{100 * p:.1f}%" if p >= 0.001 or p == 0 else f"{100 * p:.2g}%"


def alternatives_html(rows: list[dict], word: str) -> str:
    """The selected word's tokens, each with its probability, the entropy of the model's next-token distribution
    there, and the alternatives it weighed (most likely first, the emitted one marked). ``rows``: one dict per
    token with ``text``, ``p``, ``entropy``, ``top`` [(text, p)] and ``emitted`` (the emitted one's rank or -1)."""
    if not rows:
        return ""
    parts = [f'<div class="caption">Alternatives for “{html.escape(word)}”: what the model could have written '
             "instead, with its probabilities (the model's own distribution, before temperature and top-p)</div>",
             '<table class="alternatives">']
    for n, row in enumerate(rows):
        cells = []
        entropy = f'entropy {row["entropy"]:.2f} nats' if row["entropy"] is not None else "entropy not sent"
        for rank, (text, p) in enumerate(row["top"]):
            mark = " emitted" if rank == row["emitted"] else ""
            width = max(1, round(100 * p))
            cells.append(f'<td class="alt{mark}"><code>{html.escape(repr(text)[1:-1]) or "␣"}</code> '
                         f'{percent(p)}<div class="bar" style="width:{width}%"></div></td>')
        parts.append(f'<tr><th>token {n + 1}: <code>{html.escape(repr(row["text"])[1:-1])}</code> '
                     f'{percent(row["p"])}<br><span class="caption">{entropy}</span></th>'
                     f'{"".join(cells)}</tr>')
    parts.append("</table>")
    return "".join(parts)

# ----------------------------------------------------------------------------- routing

LOAD_VIEWS = ("total", "prefill", "decode", "reasoning", "answer", "text", "image", "audio")


def _cell_color(share: float) -> str:
    """0..1 -> a white-to-indigo background."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (int(255 + (t - 255) * share) for t in (67, 56, 202))
    return f"rgb({r},{g},{b})"


def load_matrix(load: dict, view: str) -> list[list[int]]:
    if view in ("text", "image", "audio"):
        return load.get("by_modality", {}).get(view, [])
    if view in ("reasoning", "answer"):  # generated tokens by phase (the engine's "by_phase")
        return load.get("by_phase", {}).get(view, [])
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


def focus_share_caption(share_map: np.ndarray | None, where: str) -> str:
    """"34% of the attention on image 1" from a map that IS a distribution of the token's attention: the
    engine's own ("default") map or the mean over layers, never a max over layers (its sum is no share).
    Clamped to 0..100 %; "" without a map."""
    if share_map is None or not np.size(share_map):
        return ""
    share = float(np.nan_to_num(np.sum(share_map, dtype=np.float64)))
    return f"{min(max(share, 0.0), 1.0):.0%} of the attention on {where}"


_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?%")


def _no_share_over_100(caption: str) -> str:
    """A safety net for captions built elsewhere: a "share" over 100 % came from a map that is not a
    distribution (max over layers), so the number goes and the rest stays."""
    if any(float(m) > 100.0 for m in _PERCENT.findall(caption)):
        rest = _PERCENT.sub("", caption).strip()
        rest = re.sub(r"^of the attention\s*", "", rest)
        return f"attention {rest}".strip()
    return caption


def focus_caption_html(label: str, captions: list[str], has_media: bool, running: bool,
                       aggregation: str = "default") -> str:
    """The line above the heatmap: whose focus it is and how much attention went where.

    ``captions`` are the shares (build them with ``focus_share_caption`` from the mean / default map);
    ``aggregation`` is the rule the DRAWING used: "max" says so, since a max-over-layers picture shows where
    any layer looked, while the shares stay the mean's. No caption ever states a share over 100 %.
    """
    if not has_media:
        return placeholder_html("This turn has no image or recording, so there is no focus to show. "
                                "Click a word of the reply to see its experts in the Routing tab.")
    if not label:
        return placeholder_html("Waiting for the first token…" if running else "The model produced no tokens.")
    shares = [_no_share_over_100(c) for c in captions if c]
    drawn = {"max": "drawn: max over layers (shares: mean over layers)",
             "mean": "drawn: mean over layers"}.get(aggregation)
    parts = [f"<b>Focus of {html.escape(label)}</b>", *map(html.escape, shares), *([drawn] if drawn else []),
             "bright = more attention"]
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


# the Model panel's Markdown lives in model_view.py; re-exported for the callers of render
from .model_view import device_map_rows, human_bytes, is_remote, model_markdown  # noqa: E402,F401
