"""The page-cost benchmark's pure parts: per-token arithmetic, the Model tab's token count, the table.

The measurement itself (a server subprocess, Chromium, several turns) takes minutes on this CPU and is
run by hand: ``python -m tools.page_cost`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json

import pytest

from tools.page_cost import report
from tools.page_cost.measure import load_example, process_cpu_s
from tools.page_cost.run import parse

MODEL_TAB = """Last answer figure value time to first token 0.36 s time to end of thinking 4.03 s
tokens / s (all) 4.1 reasoning tokens / s 9.3 (34 tokens) answer tokens / s 2.5 (28 tokens) prompt tokens 77"""


def turns(api_cpu: float, page_cpu: float, tokens: int = 50, page_text: str = "Three shapes.\n") -> dict:
    api = {"cpu_s": api_cpu, "wall_s": 1.0, "tokens": tokens, "text": "Three shapes."}
    page = {"cpu_s": page_cpu, "wall_s": 5.0, "tokens": tokens, "text": page_text, "browser_cpu_s": 2.0,
            "updates": {"focus-image": [21, 4.0], "chat": [1, 0.0]}}
    return {"api": api, "page": page}


def test_per_token_arithmetic():
    assert report.per_token_ms(0.5, 50) == pytest.approx(10.0)
    assert report.per_token_ms(0.5, 0) is None and report.per_token_ms(None, 5) is None
    assert report.tokens_per_s(62, 0.5) == pytest.approx(124.0)
    assert report.ratio(40.0, 10.0) == pytest.approx(4.0) and report.ratio(1.0, None) is None
    assert report.rate_hz(20, 4.0) == pytest.approx(5.0) and report.rate_hz(3, 0.0) is None
    assert report.median([3.0, None, 1.0, 2.0]) == 2.0 and report.median([None]) is None


def test_model_tab_tokens_are_reasoning_plus_answer_and_none_when_the_tab_does_not_say():
    assert report.model_tab_tokens(MODEL_TAB) == 62
    assert report.model_tab_tokens("No answer yet: send a message and its speed shows here.") is None


def test_summary_medians_targets_and_mismatches():
    s = report.summarize([turns(0.5, 2.0), turns(0.5, 0.6), turns(0.5, 0.7, page_text="Four shapes.")])
    r = s["rows"][0]
    assert r["api_cpu_ms_per_token"] == pytest.approx(10.0) and r["page_cpu_ms_per_token"] == pytest.approx(40.0)
    assert r["ratio"] == pytest.approx(4.0) and r["text_match"] and r["tokens_match"]
    assert r["panel_hz"] == {"focus-image": pytest.approx(5.0)}  # a panel seen once has no rate
    assert s["median"]["ratio"] == pytest.approx(1.4)
    assert s["targets"]["ratio_met"] and s["targets"]["focus_hz_met"]
    assert s["mismatches"] == [3]
    json.dumps(s)  # the JSON written


def test_table_has_a_line_per_repeat_the_median_and_the_verdict():
    text = report.table(report.summarize([turns(0.5, 2.0), turns(0.5, 2.2, tokens=49)]))
    lines = text.splitlines()
    assert lines[0].startswith("| repeat | page CPU ms/token | API CPU ms/token | ratio")
    assert "#focus-image updates/s" in lines[0]
    assert lines[2].startswith("| 1 | 40.0 | 10.0 | 4.00 | – |") and lines[2].endswith("| yes |")
    assert lines[3].endswith("| yes |")  # 49 tokens on both sides
    assert lines[4].startswith("| **median** |")
    assert "ratio <= 1.5 (NOT met)" in text


def test_parser_bounds_and_the_example_and_cpu_readers():
    assert parse([]).repeats == 3 and parse([]).max_tokens == 128
    with pytest.raises(SystemExit):
        parse(["--repeats", "0"])
    with pytest.raises(SystemExit):
        parse(["--repeats", "11"])
    image, question = load_example(0)
    assert image.exists() and question
    import psutil

    assert process_cpu_s(psutil.Process()) > 0


def test_a_reply_without_answer_text_is_checked_by_its_tokens_alone():
    t = turns(0.5, 1.0, page_text="(no answer: the model used all its new tokens while thinking)")
    t["api"]["text"] = ""
    s = report.summarize([t])
    assert s["rows"][0]["text_match"] is None and s["mismatches"] == []
    assert "tokens (no answer text)" in report.table(s)
    t["page"]["tokens"] = 49
    assert report.summarize([t])["mismatches"] == [1]


def test_idle_cpu_is_subtracted_over_each_turns_wall_time():
    t = turns(0.6, 2.5)  # API 1 s wall, page 5 s wall; the idle server burns 100 ms/s
    r = report.summarize([t], idle_ms_per_s=100.0)["rows"][0]
    assert r["ratio"] == pytest.approx(2500 / 600)
    assert r["ratio_idle_subtracted"] == pytest.approx((2.5 - 0.5) / (0.6 - 0.1))
    assert report.net_cpu_s({"cpu_s": 0.1, "wall_s": 5.0}, 100.0) == 0.0
