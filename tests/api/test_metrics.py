"""/metrics: Prometheus text with vLLM's names, parsed with prometheus_client's own parser, moving after requests."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm_app.api.metrics import EngineMetrics
from autoglm_app.events import (
    Answer,
    ChatRequest,
    Done,
    Error,
    Focus,
    LayerRoute,
    Message,
    Routing,
    Stats,
)

import numpy as np


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_move_after_a_request_through_the_api(live_server):
    before = scrape(live_server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:time_to_first_token_seconds_count"):
        assert name in before, sorted(before)[:40]
    r = httpx.post(live_server + "/v1/chat/completions", timeout=120, json={
        "model": "autoglm-phone-9b", "temperature": 0, "max_tokens": 6,
        "messages": [{"role": "user", "content": "Who are you?"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = scrape(live_server)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == \
        usage["completion_tokens"]
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 1
    assert after["vllm:inter_token_latency_seconds_count"] - before["vllm:inter_token_latency_seconds_count"] == \
        usage["completion_tokens"] - 1
    reasons = [k for k in after if k.startswith("vllm:request_success_total{finished_reason=")]
    assert sum(after[k] for k in reasons) == sum(before.get(k, 0) for k in reasons) + 1
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0


class Idle:
    running = 2
    observers: list = []

    def queue_length(self) -> int:
        return 3


def parsed(metrics: EngineMetrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_routing_focus_and_errors_are_counted_from_a_scripted_stream():
    metrics = EngineMetrics(Idle(), "m")
    request = ChatRequest([Message("user", "x")])
    load = {"layers": [0, 2], "experts": 3, "top_k": 1, "tokens": {"prefill": 4, "decode": 2},
            "prefill": [[2, 1, 1], [4, 0, 0]], "decode": [[1, 1, 0], [2, 0, 0]], "total": [[3, 2, 1], [6, 0, 0]],
            "by_modality": {}, "dropped": [0, 2], "cv": [0, 0], "entropy": [0, 0]}
    early = dict(load, total=[[1, 0, 0], [1, 0, 0]], dropped=[0, 0])
    focus = Focus(0, "a", "answer", images=[np.full((2, 2), 0.1)], audios=[np.full(4, 0.05)])
    for event in (Routing(0, "a", "answer", [LayerRoute(0, [0], [1.0])], early), focus,
                  Routing(1, "b", "answer", [LayerRoute(0, [1], [1.0])], load), Answer("ab"),
                  Stats(ttft_s=0.5, think_s=None, reasoning_tokens=0, answer_tokens=3, reasoning_tps=0,
                        answer_tps=0, tokens_per_second=2.0, prompt_tokens=4, completion_tokens=3, queue_s=0.25,
                        total_s=1.5, peak_memory={}, finish_reason="length", attention="sdpa+probe"),
                  Done("length")):
        metrics.observe(request, event)
    metrics.observe(ChatRequest([Message("user", "y")]), Error("no", kind="bad_request"))
    m = parsed(metrics)
    # only the newest Routing event's running load counts, once, at Done
    assert m["autoglm:expert_load_tokens_total{expert=0,layer=0}"] == 3
    assert m["autoglm:expert_load_tokens_total{expert=2,layer=0}"] == 1
    assert m["autoglm:expert_load_tokens_total{expert=0,layer=2}"] == 6
    assert "autoglm:expert_load_tokens_total{expert=1,layer=2}" not in m
    assert m["autoglm:routing_balancedness{layer=0}"] == pytest.approx(2 / 3)
    assert m["autoglm:routing_balancedness{layer=2}"] == pytest.approx(1 / 3)
    assert m["autoglm:routing_dropped_tokens_total"] == 2
    assert m["autoglm:focus_media_mass_sum"] == pytest.approx(0.6)
    assert m["vllm:inter_token_latency_seconds_count"] == 2
    assert m["vllm:inter_token_latency_seconds_sum"] == pytest.approx(1.0)  # (1.5 - 0.5) s over 2 gaps
    assert m["vllm:e2e_request_latency_seconds_sum"] == pytest.approx(1.75)
    assert m["vllm:request_success_total{finished_reason=length}"] == 1
    assert m["autoglm:request_errors_total{kind=bad_request}"] == 1
    assert m["vllm:num_requests_running"] == 2 and m["vllm:num_requests_waiting"] == 3
    assert metrics._last_routing == {}


def test_a_failing_observer_does_not_fail_the_request(small):
    from tests.helpers import make_engine

    eng = make_engine(*small)
    try:
        eng.observers.append(lambda request, event: 1 / 0)
        events = eng.run(ChatRequest([Message("user", "hi")]))
        assert isinstance(events[-1], Done)
    finally:
        eng.close()
