"""The load test itself, briefly: 3 clients, a budget of 12 requests, the app in this process on 127.0.0.1.

Functional, not a timing test: the JSON has its parts, no server errors, bad requests are refused,
every good answer equals its warm-up reference, the server is healthy after.
"""

from __future__ import annotations

import json

import pytest

from autoglm_app.config import Limits
from tools import loadtest


def test_short_load_run_has_no_server_errors_and_rejects_bad_requests(tmp_path, capsys):
    out = tmp_path / "load.json"
    result = loadtest.main(["--clients", "3", "--duration", "25", "--bad", "0.3", "--disconnect", "0.2",
                            "--ui", "0.25", "--max-requests", "12", "--seed", "1", "--max-tokens", "16",
                            "--pool", "2", "--warm-burst", "0", "--timeout", "60", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ("config", "requests", "outcomes", "by_kind", "ttft_ms", "latency_ms", "memory", "post_checks",
                "warmup", "acceptance"):
        assert key in result, key
    assert set(loadtest.OUTCOMES) <= set(result["outcomes"])
    assert result["requests"]["sent"] == 12  # the budget, all of it (the deadline is far)
    assert sum(result["outcomes"].values()) == 12

    o = result["outcomes"]
    assert o["server_error"] == 0, result["server_error_details"]
    assert o["client_error"] == 0
    assert o["ok_mismatch"] == 0, result["mismatch_details"]
    assert o["bad_request_accepted"] == 0
    assert o["bad_request_rejected"] >= 1  # the first requests cover every kind once, bad ones included
    assert o["ok_correct"] >= 1
    assert all(p["reference_answer"] is not None for p in result["warmup"]["pool"])
    assert result["warmup"]["stream_equals_json"]

    post = result["post_checks"]
    assert post["health"] and post["good_request"] and post["good_ui_request"] and post["engine_idle"]
    assert result["memory"]["rss_warm_mb"] and result["memory"]["rss_end_mb"]
    table = capsys.readouterr().out
    assert "| requests sent | 12 |" in table and "verdict:" in table


def test_the_parser_takes_the_servers_defaults_and_refuses_impossible_mixes():
    cfg = loadtest.parse_config([])
    assert cfg.context_limit == Limits().context_limit and cfg.url is None and cfg.max_requests is None
    cfg = loadtest.parse_config(["--url", "http://127.0.0.1:8000", "--timeout", "5", "--api-user"])
    assert cfg.url == "http://127.0.0.1:8000" and cfg.request_timeout == 5.0 and cfg.api_user
    for argv in (["--bad", "0.7", "--disconnect", "0.5"], ["--ui", "1.5"], ["--duration", "4000"], ["--clients", "0"]):
        with pytest.raises(SystemExit):
            loadtest.parse_config(argv)


def test_only_loopback_is_a_target():
    from tools.loadtest.target import loopback_only

    assert loopback_only("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(SystemExit, match="loopback"):
        loopback_only("http://example.com:8000")
