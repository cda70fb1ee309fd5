"""The command: parse, start the server, warm up, alternate API and page turns, print and write."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

from .measure import Page, PageChanged, Server, api_turn, load_example
from .report import normal, summarize, table

log = logging.getLogger("autoglm.page_cost")

MAX_REPEATS = 10


def parse(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m tools.page_cost", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help=f"API + page rounds measured (1..{MAX_REPEATS})")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens of every turn")
    p.add_argument("--example", type=int, default=0, help="which example (with an image and a question)")
    p.add_argument("--no-thinking", action="store_true", help="both turns without thinking")
    p.add_argument("--model", default=None, help="the server's --model (default: the shipped demo model)")
    p.add_argument("--server-root", type=Path, default=None,
                   help="serve this tree's app.py instead of this checkout's, e.g. a `git archive HEAD` export")
    p.add_argument("--turn-timeout", type=float, default=180.0, help="seconds one turn may take")
    p.add_argument("--deadline", type=float, default=1200.0, help="seconds the whole run may take")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "page_cost.json")
    a = p.parse_args(argv)
    if not 1 <= a.repeats <= MAX_REPEATS or a.warmup < 0 or a.warmup > 3 or a.max_tokens < 1:
        p.error(f"--repeats 1..{MAX_REPEATS}, --warmup 0..3, --max-tokens >= 1")
    return a


def idle_cpu_ms_per_s(server: Server, seconds: float = 3.0, settle: float = 0.5) -> float:
    """The server's own CPU while nothing is asked (with the page open or not)."""
    time.sleep(settle)
    cpu0, t0 = server.cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return 1000 * (server.cpu_s() - cpu0) / (time.perf_counter() - t0)


def run(a: argparse.Namespace) -> dict:
    image, question = load_example(a.example)
    thinking = not a.no_thinking
    started, load_before = time.monotonic(), os.getloadavg()
    server = Server(a.model, a.out.parent / "page_cost-server.log", root=a.server_root)
    page, no_page_idle = None, None
    rounds, warm = [], []
    try:
        server.start(timeout=240)
        no_page_idle = idle_cpu_ms_per_s(server, settle=2.0)
        page = Page(server.url, a.max_tokens, thinking, a.turn_timeout)
        idle_ms_per_s = None
        for i in range(a.warmup + a.repeats):
            if i == a.warmup:
                idle_ms_per_s = idle_cpu_ms_per_s(server)
            if time.monotonic() - started > a.deadline:
                log.warning("deadline of %.0f s reached after %d rounds", a.deadline, len(rounds))
                break
            api = api_turn(server, image, question, a.max_tokens, thinking, a.turn_timeout)
            pg = page.turn(server, image, question)
            pg["tokens_source"] = "model tab"
            pg["tokens"] = pg["model_tab_tokens"]
            if pg["tokens"] is None and normal(pg["text"]) == normal(api["text"]):
                pg["tokens"], pg["tokens_source"] = api["tokens"], "the API turn's (same reply text)"
            (warm if i < a.warmup else rounds).append({"api": api, "page": pg})
            log.info("round %d%s: API %.2f s CPU / %s tokens, page %.2f s CPU / %s tokens", i + 1,
                     " (warm-up)" if i < a.warmup else "", api["cpu_s"], api["tokens"], pg["cpu_s"], pg["tokens"])
    finally:
        try:
            if page is not None:
                page.close()
        finally:
            server.stop()
    if not rounds:
        raise SystemExit("no round was measured (deadline too short?)")
    summary = summarize(rounds, idle_ms_per_s)
    return {"config": {"repeats": a.repeats, "warmup": a.warmup, "max_tokens": a.max_tokens, "thinking": thinking,
                       "image": image.name, "question": question, "model": a.model or "demo (assets)",
                       "server_root": str(a.server_root or "this checkout"),
                       "temperature": 0, "api_extensions": ["return_focus", "return_routing"],
                       "viewport": "1366x768", "machine": f"{platform.machine()} {platform.processor()}".strip(),
                       "cpus": os.cpu_count(), "load_average_before": load_before,
                       "load_average_after": os.getloadavg()},
            "server_idle_cpu_ms_per_s": idle_ms_per_s, "server_idle_cpu_ms_per_s_no_page": no_page_idle, "summary": summary, "rounds": rounds, "warmup_rounds": warm,
            "finished_signal": "page: no element carries Gradio's 'generating' class after one did; API: the "
                               "stream's end; both: vllm:request_success_total counted the request"}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse(argv)
    try:
        result = run(a)
    except PageChanged as e:
        raise SystemExit(f"page_cost: {e}") from e
    print(table(result["summary"]))
    if result["server_idle_cpu_ms_per_s"] is not None:
        print(f"server idle: {result['server_idle_cpu_ms_per_s']:.1f} ms CPU per s with the page open, "
              f"{result['server_idle_cpu_ms_per_s_no_page']:.1f} before it was opened")
    if result["summary"]["mismatches"]:
        print(f"MISMATCH: page and API replies differ in repeat(s) {result['summary']['mismatches']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return result
