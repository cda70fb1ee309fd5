"""The run: start or reach the server, warm up, drive the clients until the deadline or the budget,
check the server after; ``main`` prints the table and writes the JSON."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from .answers import Outcome, completion_signature, ui_problem
from .client import Budget, Client, PoolItem, body_for, make_pool
from .options import BACKOFF_CAP_S, DISCONNECT_KINDS, GOOD_KINDS, LoadConfig, parse_config
from .report import load_table, summarise
from .target import RSSSampler, Target, engine_idle, start_target

log = logging.getLogger("autoglm.loadtest")


def warm_up(clients: list[Client], pool: list[PoolItem], cfg: LoadConfig) -> dict:
    """References for every pool item, each request alone; then a short concurrent burst."""
    c = clients[0]
    ui_client = next((x for x in clients if x.ui is not None), None)
    info = {"stream_equals_json": True, "problems": []}
    for item in pool:
        resp = c.http.post("/v1/chat/completions", json=body_for(item, False, cfg.max_tokens), headers=c.headers)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request {item.index} failed: HTTP {resp.status_code} {resp.text[:300]}")
        item.api_ref = completion_signature(resp)
        again = c.api_stream(item, time.perf_counter())  # judged against the reference just taken
        if again.outcome != "ok_correct":
            info["stream_equals_json"] = False
            info["problems"].append(f"pool {item.index}: stream {again.outcome} {again.detail}")
        if ui_client is not None:
            sig = ui_client.ui_answer(item)
            if ui_problem(sig):
                raise RuntimeError(f"warm-up UI request {item.index} failed: {ui_problem(sig)}")
            item.ui_ref = sig
    # the concurrent burst: every client, every good kind, unmeasured
    if cfg.warm_burst > 0:
        def burst(cl: Client) -> None:
            for i in range(cfg.warm_burst):
                kind = GOOD_KINDS[(cl.index + i) % 3]
                if kind == "ui_chat" and cl.ui is None:
                    kind = "api_stream"
                cl.run(kind)

        threads = [threading.Thread(target=burst, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=cfg.request_timeout * (cfg.warm_burst + 1))
    return info


def run_load(cfg: LoadConfig) -> dict:
    """Start (or reach) the server, warm up, run the clients, check the server after; the result as a dict."""
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-load-"))
    t_setup = time.monotonic()
    target = start_target(cfg, workdir)
    clients: list[Client] = []
    try:
        rss_start = target.rss()
        pool = make_pool(cfg.pool, cfg.seed, workdir)
        clients = make_clients(cfg, target, pool)
        warm = warm_up(clients, pool, cfg)
        rss_warm = target.rss()
        setup_s = time.monotonic() - t_setup

        sampler = RSSSampler(None if target.in_process else target.pid)
        if target.in_process or target.pid:
            sampler.start()
        outcomes, t_run, duration = drive(clients, cfg)
        sampler.stop()
        rss_after_run = target.rss()

        post = {"engine_idle": engine_idle(target.engine)}
        try:
            import httpx

            h = httpx.get(target.url + "/health", timeout=10, trust_env=False)
            post["health"] = h.status_code == 200 and h.json().get("status") == "ok"
        except Exception as e:  # the server is gone: that is the finding
            post["health"] = False
            post["health_error"] = f"{type(e).__name__}: {e}"
        final = clients[0].run("api_json") if pool else None
        post["good_request"] = bool(final and final.outcome == "ok_correct")
        if final and final.outcome != "ok_correct":
            post["good_request_detail"] = f"{final.outcome}: {final.detail}"
        if clients[0].ui is not None:
            final_ui = clients[0].run("ui_chat")
            post["good_ui_request"] = final_ui.outcome == "ok_correct"
            if final_ui.outcome != "ok_correct":
                post["good_ui_request_detail"] = f"{final_ui.outcome}: {final_ui.detail}"
        rss_end = target.rss()
        log_errors, log_samples = target.log_errors()
    finally:
        for c in clients:
            c.close()
        if target.stop is not None:
            target.stop()
    return summarise(cfg, target, pool, warm, outcomes, duration, setup_s,
                     {"start": rss_start, "warm": rss_warm, "after_run": rss_after_run, "end": rss_end,
                      "samples": sampler.samples}, post, log_errors, log_samples)


def make_clients(cfg: LoadConfig, target: Target, pool: list[PoolItem]) -> list[Client]:
    """All clients, built in parallel (a gradio_client Client takes about a second to connect)."""
    clients: list[Client | None] = [None] * cfg.clients
    errors: list[BaseException] = []

    def build(i: int) -> None:
        try:
            clients[i] = Client(i, cfg, target, pool, ui=cfg.ui > 0)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors or any(c is None for c in clients):
        for c in clients:
            if c is not None:
                c.close()
        raise RuntimeError(f"could not connect the clients: {errors[:1]}")
    return clients  # type: ignore[return-value]


def all_kinds(clients: list[Client], cfg: LoadConfig) -> list[str]:
    """One of every kind the mix can draw (the first requests of a run, with ``cover``)."""
    good = ["api_stream"] + (["api_json"] if cfg.json_share > 0 else []) + (["ui_chat"] if clients[0].ui else [])
    bad = clients[0].bad_kinds() if cfg.bad > 0 else []
    return good + bad + (list(DISCONNECT_KINDS) if cfg.disconnect > 0 else [])


def drive(clients: list[Client], cfg: LoadConfig) -> tuple[list[Outcome], float, float]:
    """Every client loops until the deadline or the budget; returns (outcomes, start, seconds)."""
    t_run = time.monotonic()
    deadline = t_run + cfg.duration
    budget = Budget(cfg.max_requests, deadline)
    forced = all_kinds(clients, cfg) if cfg.cover else []
    random.Random(cfg.seed).shuffle(forced)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def loop(cl: Client) -> None:
        while True:
            with lock:
                kind = forced.pop() if forced else None
            if not budget.take():
                return
            kind = kind or cl.pick()
            try:
                out = cl.run(kind)
            except Exception as e:  # a bug in the load test, not the server: kept apart
                log.exception("client %d: %s failed in the load test itself", cl.index, kind)
                out = Outcome(kind, "client_error", detail=f"{type(e).__name__}: {e}", client=cl.index)
            out.t = round(time.monotonic() - t_run, 3)
            outcomes.append(out)
            if out.outcome == "busy":
                time.sleep(max(0.0, min(out.retry_after or 1.0, BACKOFF_CAP_S, deadline - time.monotonic())))

    threads = [threading.Thread(target=loop, args=(c,), name=f"load-client-{c.index}") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg.duration + 2 * cfg.request_timeout + 30)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        log.error("%d client threads still running after the join timeout", stuck)
    return list(outcomes), t_run, time.monotonic() - t_run


def main(argv: list[str] | None = None) -> dict:
    """``python -m tools.loadtest ...``: run, print the table, write the JSON; returns the result."""
    logging.basicConfig(level=logging.WARNING)
    cfg = parse_config(argv)
    result = run_load(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(load_table(result))
    print(f"\nJSON: {out}")
    return result
