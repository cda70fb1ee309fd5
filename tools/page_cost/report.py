"""The pure part: per-token arithmetic, the Model tab's token count, the table and the summary."""

from __future__ import annotations

import re
import statistics

TARGET_RATIO = 1.5  # issue 16: a page turn costs the server at most 1.5x the CPU per token of an API turn
TARGET_HZ = 4.0  # ... while the panels still update at 4 Hz or more
PANELS = ("focus-image", "words", "routing", "chat")  # the page's ids whose changes are counted


def per_token_ms(cpu_s: float | None, tokens: int | None) -> float | None:
    """Milliseconds of CPU per generated token; None without tokens."""
    if cpu_s is None or not tokens or tokens <= 0:
        return None
    return 1000.0 * cpu_s / tokens


def tokens_per_s(tokens: int | None, wall_s: float | None) -> float | None:
    if not tokens or not wall_s or wall_s <= 0:
        return None
    return tokens / wall_s


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def rate_hz(count: int, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0:
        return None
    return count / seconds


def median(values) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def model_tab_tokens(text: str) -> int | None:
    """Reasoning + answer tokens of the Model tab's "Last answer" (``... (34 tokens)`` on both rows), or
    None when the tab does not say (its format changed, or no answer yet)."""
    counts = [int(n) for n in re.findall(r"(?:reasoning|answer) tokens / s\s*[\d.]+\s*\((\d+) tokens?\)", text)]
    return sum(counts) if len(counts) == 2 else None


def normal(text: str | None) -> str:
    """Text compared across the page and the API: whitespace folded, the chat's trailing newline gone."""
    return " ".join((text or "").split())


def net_cpu_s(turn: dict, idle_ms_per_s: float | None) -> float | None:
    """A turn's server CPU less what the idle server burns in the same wall time (None without a rate)."""
    if idle_ms_per_s is None or turn.get("cpu_s") is None or turn.get("wall_s") is None:
        return None
    return max(0.0, turn["cpu_s"] - idle_ms_per_s * turn["wall_s"] / 1000.0)


def row(api: dict, page: dict, idle_ms_per_s: float | None = None) -> dict:
    """One repeat's figures from its API turn and its page turn (``idle_ms_per_s``: the idle server's CPU)."""
    api_ms = per_token_ms(api.get("cpu_s"), api.get("tokens"))
    page_ms = per_token_ms(page.get("cpu_s"), page.get("tokens"))
    net = ratio(per_token_ms(net_cpu_s(page, idle_ms_per_s), page.get("tokens")),
                per_token_ms(net_cpu_s(api, idle_ms_per_s), api.get("tokens")))
    # updates: {panel id: [changes seen, seconds from the first change to the last]}
    hz = {k: rate_hz(n - 1, span) for k, (n, span) in (page.get("updates") or {}).items() if n >= 2}
    return {"api_cpu_ms_per_token": api_ms, "page_cpu_ms_per_token": page_ms, "ratio": ratio(page_ms, api_ms),
            "ratio_idle_subtracted": net,
            "api_tok_s": tokens_per_s(api.get("tokens"), api.get("wall_s")),
            "page_tok_s": tokens_per_s(page.get("tokens"), page.get("wall_s")),
            "browser_cpu_ms_per_token": per_token_ms(page.get("browser_cpu_s"), page.get("tokens")),
            "panel_hz": hz,
            "tokens_match": api.get("tokens") == page.get("tokens"),
            # None: the API turn has no answer (all its tokens went to thinking), so the tokens alone decide
            "text_match": normal(api.get("text")) == normal(page.get("text")) if normal(api.get("text")) else None}


def summarize(rounds: list[dict], idle_ms_per_s: float | None = None) -> dict:
    """Per-repeat rows (``rounds``: [{"api": ..., "page": ...}]) and their medians, against the targets."""
    rows = [row(r["api"], r["page"], idle_ms_per_s) for r in rounds]
    keys = ("api_cpu_ms_per_token", "page_cpu_ms_per_token", "ratio", "ratio_idle_subtracted", "api_tok_s",
            "page_tok_s", "browser_cpu_ms_per_token")
    med = {k: median(r[k] for r in rows) for k in keys}
    med["panel_hz"] = {p: median(r["panel_hz"].get(p) for r in rows) for p in PANELS
                       if any(p in r["panel_hz"] for r in rows)}
    focus_hz = med["panel_hz"].get("focus-image")
    return {"rows": rows, "median": med,
            "mismatches": [i + 1 for i, r in enumerate(rows) if not r["tokens_match"] or r["text_match"] is False],
            "targets": {"ratio_max": TARGET_RATIO, "panel_hz_min": TARGET_HZ,
                        "ratio_met": med["ratio"] is not None and med["ratio"] <= TARGET_RATIO,
                        "focus_hz_met": focus_hz is not None and focus_hz >= TARGET_HZ}}


def _f(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(summary: dict) -> str:
    """Markdown: one line per repeat and the median."""
    panels = [p for p in PANELS if p in summary["median"]["panel_hz"]]
    head = (["repeat", "page CPU ms/token", "API CPU ms/token", "ratio", "ratio, idle CPU subtracted",
             "page tok/s", "API tok/s",
             "browser CPU ms/token"] + [f"#{p} updates/s" for p in panels] + ["same reply"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, r: dict, same: str) -> str:
        cells = [name, _f(r["page_cpu_ms_per_token"]), _f(r["api_cpu_ms_per_token"]), _f(r["ratio"], 2),
                 _f(r["ratio_idle_subtracted"], 2), _f(r["page_tok_s"]), _f(r["api_tok_s"]), _f(r["browser_cpu_ms_per_token"])]
        cells += [_f(r["panel_hz"].get(p)) for p in panels] + [same]
        return "| " + " | ".join(cells) + " |"

    for i, r in enumerate(summary["rows"], 1):
        wrong = [w for w, ok in (("tokens", r["tokens_match"]), ("text", r["text_match"])) if ok is False]
        same = f"NO ({', '.join(wrong)})" if wrong else "yes" if r["text_match"] else "tokens (no answer text)"
        lines.append(line(str(i), r, same))
    lines.append(line("**median**", summary["median"], "–"))
    t = summary["targets"]
    lines.append("")
    lines.append(f"target: ratio <= {t['ratio_max']} ({'met' if t['ratio_met'] else 'NOT met'}); "
                 f"focus heatmap updates >= {t['panel_hz_min']:.0f}/s ({'met' if t['focus_hz_met'] else 'NOT met'})")
    return "\n".join(lines)
