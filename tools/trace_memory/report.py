"""The pure part: the figures of a run against the budget, and the tables."""

from __future__ import annotations

MiB = 2**20
TARGET_OVER = 0.10  # issue 18: the process grows by at most the budget + 10 %


def mib(n: float | None) -> float | None:
    return None if n is None else n / MiB


def summarize(budget_bytes: int, growth_peak: int, growth_end: int, counts: dict, unbounded_detail: int) -> dict:
    """The run's headline figures (bytes in, MiB and ratios out)."""
    ratio = growth_peak / budget_bytes if budget_bytes else None
    return {"budget_mib": mib(budget_bytes), "session_budget_mib": mib(counts["session_limit_bytes"]),
            "growth_peak_mib": mib(growth_peak), "growth_end_mib": mib(growth_end),
            "growth_over_budget": ratio, "detail_unbounded_mib": mib(unbounded_detail),
            "detail_held_mib": mib(counts["detail_bytes"]), "kept_mib": mib(counts["kept_bytes"]),
            "uncounted_mib": mib(growth_end - counts["detail_bytes"] - counts["kept_bytes"]),
            "tokens_whole": counts["tokens_whole"], "tokens_coarse": counts["tokens_coarse"],
            "tokens_dropped": counts["tokens_dropped_total"], "tokens_coarsened": counts["tokens_coarsened_total"],
            "target_over": TARGET_OVER, "target_met": ratio is not None and ratio <= 1 + TARGET_OVER}


def _f(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def table(config: dict, s: dict) -> str:
    """Markdown: the one line of the run, and the target."""
    head = ["budget (MiB)", "one session (MiB)", "turns x tokens (sessions)", "detail if all kept (MiB)",
            "RSS growth, peak (MiB)", "growth / budget", "detail held (MiB)", "shown maps + records (MiB)",
            "not counted (MiB)", "tokens: detail whole / coarse / dropped"]
    cells = [_f(s["budget_mib"], 0), _f(s["session_budget_mib"], 0),
             f"{config['turns']} x {config['tokens']:,} ({config['sessions']})", _f(s["detail_unbounded_mib"]),
             _f(s["growth_peak_mib"]), _f(s["growth_over_budget"], 2), _f(s["detail_held_mib"]),
             _f(s["kept_mib"]), _f(s["uncounted_mib"]),
             f"{s['tokens_whole']:,} / {s['tokens_coarse']:,} / {s['tokens_dropped']:,}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |", ""]
    lines.append(f"target: RSS growth <= budget + {s['target_over']:.0%} "
                 f"({'met' if s['target_met'] else 'NOT met'}); 'not counted' = growth at the end less what the "
                 "budget counts (heap holes, and records beyond the budget's estimate)")
    return "\n".join(lines)


def turns_table(samples: list[dict]) -> str:
    """Markdown: the growth at the end of each turn."""
    lines = ["| turn | tokens so far | RSS growth (MiB) | detail held (MiB) | shown maps + records (MiB) |",
             "|---|---|---|---|---|"]
    for r in samples:
        if r.get("turn_end"):
            lines.append(f"| {r['turn']} | {r['tokens']:,} | {_f(mib(r['growth']))} | {_f(mib(r['detail']))} | "
                         f"{_f(mib(r['kept']))} |")
    return "\n".join(lines)
