"""The Model panel as Markdown: the model's identity, devices and memory, and the last answer's speed.

Pure like ``render``: ``engine.info()``, a memory reading and ``Stats`` in, Markdown out.
"""

from __future__ import annotations

import math

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


def _decode_tps(stats) -> str:
    """The engine's own decode speed: tokens after the first over the time after the first token (the
    engine's clock, not the page's), so a slow browser or page never shows as a slow model."""
    decode_s = (stats.total_s or 0.0) - (stats.ttft_s or 0.0)  # both from the start of work (no queue)
    n = (stats.completion_tokens or 0) - 1
    return f"{n / decode_s:.1f}" if n > 0 and decode_s > 0 else "–"


def _last_answer(stats) -> list[str]:
    lines = ["#### Last answer"]
    if stats is None:
        lines.append("*No answer yet: send a message and its speed shows here.*")
    else:
        lines += ["| figure | value |", "|---|---|",
                  f"| time to first token | {_seconds(stats.ttft_s)} |",
                  f"| time to end of thinking | {_seconds(stats.think_s)} |",
                  f"| decode tokens / s (engine) | {_decode_tps(stats)} |",
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
