"""The run's result as a dict (the JSON) and as a table, with the acceptance checks."""

from __future__ import annotations

import math
import os
import platform
from collections import Counter, defaultdict
from dataclasses import asdict

from .answers import Outcome
from .client import PoolItem
from .options import GOOD_KINDS, OUTCOMES, LoadConfig
from .target import Target


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def mb(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def summarise(cfg: LoadConfig, target: Target, pool: list[PoolItem], warm: dict, outcomes: list[Outcome],
              duration: float, setup_s: float, rss: dict, post: dict, log_errors: int, log_samples: list) -> dict:
    import torch

    counts = Counter(o.outcome for o in outcomes)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind][o.outcome] += 1
    ttft = [o.ttft_s for o in outcomes if o.kind == "api_stream" and o.outcome == "ok_correct" and o.ttft_s is not None]
    latency = {k: [o.latency_s for o in outcomes if o.kind == k and o.outcome in ("ok_correct", "ok_mismatch")]
               for k in GOOD_KINDS}
    good = counts["ok_correct"] + counts["ok_mismatch"]
    served = good + counts["bad_request_rejected"] + counts["bad_request_accepted"]
    samples = rss.pop("samples")
    ratio = rss["end"] / rss["warm"] if rss["end"] and rss["warm"] else None
    server_errors = [o for o in outcomes if o.outcome == "server_error"]
    checks = {
        "server_errors_zero": counts["server_error"] == 0,
        "good_requests_answered_correctly": good > 0 and counts["ok_mismatch"] == 0,
        "bad_requests_rejected": counts["bad_request_accepted"] == 0
        and (cfg.bad <= 0 or counts["bad_request_rejected"] > 0),
        "memory_end_within_10pct_of_warm": None if ratio is None else abs(ratio - 1) <= 0.10,
        "after_run_health_and_good_request": bool(post.get("health") and post.get("good_request")
                                                  and post.get("good_ui_request", True)
                                                  and post.get("engine_idle") is not False),
        "no_server_error_logs": log_errors == 0,
        "no_load_test_errors": counts["client_error"] == 0,
    }
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "server": {"url": target.url,
                   "mode": "in-process" if target.in_process else ("spawned" if target.stop else "external"),
                   "pid": target.pid, "model": target.model_id, "api_key_set": bool(target.api_key)},
        "setup_s": round(setup_s, 1),
        "duration_s": round(duration, 1),
        "requests": {"sent": len(outcomes), "served": served, "good": good,
                     "served_per_minute": round(served / duration * 60, 1) if duration else None,
                     "good_per_minute": round(good / duration * 60, 1) if duration else None},
        "outcomes": {k: counts.get(k, 0) for k in (*OUTCOMES, "client_error")},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "server_error_details": Counter(o.detail[:160] for o in server_errors).most_common(20),
        "mismatch_details": [o.detail[:400] for o in outcomes if o.outcome == "ok_mismatch"][:10],
        "ttft_ms": {"n": len(ttft), "p50": ms(percentile(ttft, 0.5)), "p95": ms(percentile(ttft, 0.95)),
                    "max": ms(max(ttft) if ttft else None)},
        "latency_ms": {k: {"n": len(v), "p50": ms(percentile(v, 0.5)), "p95": ms(percentile(v, 0.95))}
                       for k, v in latency.items()},
        "memory": {**{f"rss_{k}_mb": mb(v) for k, v in rss.items()},
                   "rss_peak_mb": mb(max((v for _, v in samples), default=None)),
                   "ratio_end_over_warm": None if ratio is None else round(ratio, 3),
                   "samples_mb": [(t, mb(v)) for t, v in samples[:: max(1, len(samples) // 60)]],
                   "measured": "this process (server and clients)" if target.in_process
                   else ("server process" if target.pid else "not measured (give --pid)")},
        "post_checks": post,
        "server_log_errors": {"count": log_errors, "samples": log_samples, "log": target.log_path},
        "warmup": {**warm, "pool": [{"index": p.index, "task": p.task, "question": p.question,
                                     "image": p.png is not None,
                                     "thinking": p.thinking, "shapesworld_answer": p.truth,
                                     "reference_reasoning": p.api_ref[0] if p.api_ref else None,
                                     "reference_answer": p.api_ref[1] if p.api_ref else None,
                                     "reference_finish": p.api_ref[2] if p.api_ref else None} for p in pool]},
        "acceptance": {**checks, "pass": all(v is not False for v in checks.values())},
    }


def load_table(r: dict) -> str:
    c, m, o, post = r["config"], r["memory"], r["outcomes"], r["post_checks"]
    ratio = m["ratio_end_over_warm"]
    verdict = "n/a" if ratio is None else ("PASS" if abs(ratio - 1) <= 0.10 else "FAIL")
    lines = [
        f"{c['clients']} clients for {r['duration_s']} s (budget {c['max_requests'] or 'none'}), {c['bad']:.0%} bad, "
        f"{c['disconnect']:.0%} disconnects, {c['ui']:.0%} of good via the UI, max_tokens {c['max_tokens']}; "
        f"server {r['server']['mode']} {r['server']['url']} ({r['server']['model']}), {r['machine']['cpus']} CPUs",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests sent | {r['requests']['sent']} |",
        f"| requests served (answered + refused bad) | {r['requests']['served']} "
        f"({r['requests']['served_per_minute']}/min) |",
        f"| good requests answered | {r['requests']['good']} ({r['requests']['good_per_minute']}/min) |",
    ]
    lines += [f"| {k} | {v} |" for k, v in o.items() if v or k in ("ok_correct", "ok_mismatch", "server_error")]
    t = r["ttft_ms"]
    lines.append(f"| TTFT, good API streams (n={t['n']}) | p50 {t['p50']} ms, p95 {t['p95']} ms, max {t['max']} ms |")
    for k, v in r["latency_ms"].items():
        if v["n"]:
            lines.append(f"| latency {k} (n={v['n']}) | p50 {v['p50']} ms, p95 {v['p95']} ms |")
    lines += [
        f"| resident memory ({m['measured']}) | start {m['rss_start_mb']} MB, after warm-up {m['rss_warm_mb']} MB, "
        f"peak {m['rss_peak_mb']} MB, end {m['rss_end_mb']} MB |",
        f"| end / after warm-up | {ratio} → {verdict} (within 10%) |",
        f"| after the run | health {post.get('health')}, good API request {post.get('good_request')}, "
        f"good UI request {post.get('good_ui_request')}, engine idle {post.get('engine_idle')} |",
        f"| server ERROR log lines | {r['server_log_errors']['count']} |",
        "",
        "| kind | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]
    for kind, v in r["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(v.get(k, 0) or "") for k in OUTCOMES) + " |")
    a = r["acceptance"]
    lines += ["", "acceptance: " + ", ".join(f"{k} {'ok' if v else ('n/a' if v is None else 'FAIL')}"
                                             for k, v in a.items() if k != "pass"),
              f"verdict: {'PASS' if a['pass'] else 'FAIL'}"]
    if r["server_error_details"]:
        lines.append("server errors: " + "; ".join(f"{n}× {d}" for d, n in r["server_error_details"][:5]))
    if r["mismatch_details"]:
        lines.append("mismatches: " + "; ".join(r["mismatch_details"][:3]))
    return "\n".join(lines)
