"""The load test itself, briefly: 3 clients, a budget of 12 requests, the app in this process on 127.0.0.1.

Functional, not a timing test: the JSON has its parts, no server errors, bad requests are refused,
every good answer equals its warm-up reference, the server is healthy after.
"""

from __future__ import annotations

import json
from argparse import Namespace

from tools import loadtest


def test_short_load_run_has_no_server_errors_and_rejects_bad_requests(tmp_path, capsys):
    out = tmp_path / "load.json"
    args = Namespace(clients=3, duration=25.0, bad=0.3, disconnect=0.2, ui=0.25, max_requests=12, seed=1,
                     max_tokens=16, pool=2, warm_burst=0, timeout=60.0, url=None, pid=None, api_key=None,
                     spawn=False, model=None, context_limit=8192, out=out)
    result = loadtest.main(args)

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
