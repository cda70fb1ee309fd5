"""What the load test sends and how much: the request kinds, the outcomes, ``LoadConfig`` and its parser.

The server-side defaults (the context limit, the model) come from ``autoglm_app.config``, not copies.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from autoglm_app.config import Limits, default_model

GOOD_KINDS = ("api_stream", "api_json", "ui_chat")
BAD_KINDS = ("bad_json", "bad_base64", "bad_part", "bad_temperature", "bad_n", "bad_max_tokens",
             "bad_long_prompt", "bad_model", "bad_key", "ui_empty")
DISCONNECT_KINDS = ("disconnect_raw", "disconnect_first_chunk", "disconnect_first_token")
OUTCOMES = ("ok_correct", "ok_mismatch", "bad_request_rejected", "bad_request_accepted", "busy",
            "disconnect_done", "server_error")
POOL_TASKS = ("count", "color", "where", "exists", "describe", "identity", "count", "color")
BACKOFF_CAP_S = 3.0


@dataclass
class LoadConfig:
    clients: int = 16
    duration: float = 120.0
    bad: float = 0.1
    disconnect: float = 0.1
    ui: float = 0.25  # share of the good requests that go through the UI
    json_share: float = 0.25  # share of the good API requests that are not streamed
    max_requests: int | None = None
    seed: int = 0
    max_tokens: int = 48
    pool: int = 8
    warm_burst: int = 2  # good requests per client, all at once, before RSS "after warm-up"
    cover: bool = True  # the first requests cover every kind once
    request_timeout: float = 60.0
    url: str | None = None  # an already-running server; None: start one here
    pid: int | None = None  # that server's process id, for its resident memory
    api_key: str | None = None  # the key the target server wants (a server started here gets one)
    spawn: bool = False  # start the server as a child process instead of in this process
    model: str | None = None  # None: config.default_model()
    model: str | None = None  # None: config.default_model()
    context_limit: int = Limits().context_limit  # the target's, for the too-long prompt
    api_user: bool = False  # good API requests carry user=<client> (one engine session per client, like the UI)
    out: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """``python -m tools.loadtest``'s flags; every default is LoadConfig's."""
    d = LoadConfig()
    p = argparse.ArgumentParser(prog="python -m tools.loadtest",
                                description="Load test on 127.0.0.1: concurrent UI + API clients, bad requests, "
                                            "disconnects; prints a table and writes JSON (docs/RELIABILITY.md).")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent client threads")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load (at most 3600)")
    p.add_argument("--bad", type=float, default=d.bad, help="share of bad requests (must get a 4xx)")
    p.add_argument("--disconnect", type=float, default=d.disconnect, help="share of requests that hang up mid-stream")
    p.add_argument("--ui", type=float, default=d.ui, help="share of the good requests sent through the UI (0: none)")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="stop after this many requests in all")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the request pool and every client's mix")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max new tokens of a good request")
    p.add_argument("--pool", type=int, default=d.pool, help="distinct good requests (each gets a reference at warm-up)")
    p.add_argument("--warm-burst", type=int, default=d.warm_burst,
                   help="good requests per client, concurrently, in warm-up")
    p.add_argument("--timeout", dest="request_timeout", type=float, default=d.request_timeout,
                   help="per-request timeout, seconds")
    p.add_argument("--url", default=d.url, help="an already-running server on loopback (default: start one here)")
    p.add_argument("--pid", type=int, default=d.pid, help="with --url: the server's pid, for its resident memory")
    p.add_argument("--api-key", default=d.api_key, help="with --url: the server's API key (enables the wrong-key case)")
    p.add_argument("--spawn", action="store_true", help="start the server as a child process (python app.py)")
    p.add_argument("--model", default=d.model, help=f"model for the server started here (default: {default_model()})")
    p.add_argument("--context-limit", type=int, default=d.context_limit, help="with --url: the server's context limit")
    p.add_argument("--api-user", action="store_true",
                   help="good API requests send user=<client id>: one engine session per client, as the UI has")
    p.add_argument("--out", default=str(Path("bench-results") / "load.json"), help="where the JSON goes")
    return p


def parse_config(argv: list[str] | None = None) -> LoadConfig:
    """LoadConfig from the command line, refusing shares and durations the run cannot have."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = LoadConfig(**{f.name: getattr(args, f.name) for f in fields(LoadConfig) if hasattr(args, f.name)})
    if cfg.bad + cfg.disconnect > 1 or min(cfg.bad, cfg.disconnect, cfg.ui) < 0 or cfg.ui > 1:
        parser.error("--bad + --disconnect must be at most 1, and --ui within [0, 1]")
    if cfg.clients < 1 or cfg.duration <= 0 or cfg.duration > 3600:
        parser.error("--clients must be >= 1 and --duration within (0, 3600] seconds")
    return cfg
