"""Issue 20 on the wire: ``return_routed_experts`` (vLLM's layout: base64 of an .npy int16 array
[tokens, moe_layers, top_k]) equal to the per-token routing, streamed and not; the routing figures in the
stats; the new /metrics names (balancedness windows, dead experts, diversity, routed tokens by phase,
vllm:kv_cache_usage_perc); 405 in the OpenAPI schema."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest

from autoglm_app.api.metrics import EngineMetrics
from autoglm_app.events import ChatRequest, Done, Message, Options, Routing
from tests.api.test_metrics import Idle, parsed, scrape
from tests.api_helpers import body, post, serve, sse_events


@pytest.fixture(scope="module")
def live_server(engine):
    """The API alone on the session engine (the page is not needed here)."""
    running = serve(engine)
    yield running.url
    running.stop()


def decode(s: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


def ask(url: str, **kw) -> dict:
    r = post(url, body(messages=[{"role": "user", "content": "Who are you?"}], max_tokens=6, seed=0, **kw))
    assert r.status_code == 200, r.text
    return r.json()


def test_routed_experts_cover_the_prompt_and_the_generated_tokens_as_the_routing_says(live_server, engine):
    data = ask(live_server, return_routed_experts=True, return_routing=True)
    choice = data["choices"][0]
    arr = decode(choice["routed_experts"])
    info = engine.rt
    P, G = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
    assert arr.dtype == np.int16 and arr.shape == (P + G - 1, len(info.routers), info.top_k)
    routing = choice["message"]["routing"]
    assert len(routing) == G
    # the routing event of token 0 is the last prompt token's; token i's is generated token i - 1's
    assert arr[P - 1].tolist() == [layer["experts"] for layer in routing[0]["layers"]]
    for i in range(1, G):
        assert arr[P + i - 1].tolist() == [layer["experts"] for layer in routing[i]["layers"]]
    assert ((arr >= 0) & (arr < info.num_experts)).all()


def test_routed_experts_alone_add_no_per_token_routing_and_stream_on_the_finish_chunk(live_server):
    plain = ask(live_server, return_routed_experts=True)
    assert "routing" not in plain["choices"][0]["message"] and "stats" not in plain
    expected = decode(plain["choices"][0]["routed_experts"])
    payload = body(messages=[{"role": "user", "content": "Who are you?"}], max_tokens=6, seed=0, stream=True,
                   return_routed_experts=True)
    with httpx.stream("POST", live_server + "/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        chunks = [c for c in sse_events(r) if c != "[DONE]"]
    carrying = [c for c in chunks if c.get("choices") and c["choices"][0].get("routed_experts")]
    assert len(carrying) == 1 and carrying[0]["choices"][0]["finish_reason"]
    assert np.array_equal(decode(carrying[0]["choices"][0]["routed_experts"]), expected)  # greedy: the same
    assert not any(c["choices"][0]["delta"].get("routing") for c in chunks if c.get("choices"))
    without = ask(live_server)
    assert "routed_experts" not in without["choices"][0]


def test_the_stats_carry_the_routing_figures(live_server):
    data = ask(live_server, return_routing=True)
    stats = data["stats"]
    load, summary = stats["expert_load"], stats["routing"]
    for key in ("balancedness", "dead_fraction", "diversity", "window_tokens", "by_phase", "phase_tokens"):
        assert key in load, key
    assert set(load["balancedness"]) == {"10", "100", "1000", "all"}
    assert summary["balancedness"] == load["balancedness"] and summary["layers"] == load["layers"]
    decode_load = np.array(load["decode"])
    split = sum((np.array(v) for v in load["by_phase"].values()), np.zeros_like(decode_load))
    assert split.tolist() == load["decode"]


def test_the_engine_reports_its_kv_cache_usage_while_a_request_runs(engine):
    seen: list[tuple[int, float]] = []

    def watch(request, event):
        if isinstance(event, Routing):
            seen.append((event.index, engine.kv_cache_usage))

    engine.observers.append(watch)
    try:
        events = engine.run(ChatRequest([Message("user", "hi")], Options(max_new_tokens=5, temperature=0)))
    finally:
        engine.observers.remove(watch)
    assert isinstance(events[-1], Done) and seen
    prompt = events[-2].prompt_tokens
    positions = engine.max_batch * engine.rt.context_limit  # every slot's, the share of all the KV held
    # a token's events are observed when they are delivered, which may be a few tokens later (4 ms)
    for i, usage in seen:
        assert (prompt + i) / positions - 1e-9 <= usage <= (prompt + 5) / positions + 1e-9
    # Done reaches the reader before the worker hands the slot back (a step later at most): wait for that, bounded
    deadline = time.monotonic() + 10
    while not engine.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv_cache_usage == 0.0  # idle again


def test_metrics_hold_the_new_routing_names_and_the_kv_cache_usage(live_server):
    ask(live_server)
    m = scrape(live_server)
    assert m["vllm:kv_cache_usage_perc"] == 0.0  # idle
    for prefix in ("autoglm:routing_balancedness_window{layer=", "autoglm:routing_dead_experts_fraction{layer=",
                   "autoglm:routing_expert_diversity{layer=", "autoglm:routed_tokens_total{phase=prefill"):
        assert any(k.startswith(prefix) for k in m), prefix
    windows = {k.split("window=")[1].rstrip("}") for k in m if k.startswith("autoglm:routing_balancedness_window")}
    assert windows == {"10", "100", "1000"}


def test_metrics_from_a_scripted_load_with_the_new_keys():
    class Busy(Idle):
        kv_cache_usage = 0.25

    metrics = EngineMetrics(Busy(), "m")
    load = {"layers": [0, 2], "experts": 3, "top_k": 1, "tokens": {"prefill": 4, "decode": 2},
            "total": [[3, 2, 1], [6, 0, 0]], "dropped": [0, 0],
            "balancedness": {"10": [0.5, 1 / 3], "100": [0.5, 1 / 3], "1000": [0.5, 1 / 3], "all": [2 / 3, 1 / 3]},
            "dead_fraction": {"10": [0.0, 2 / 3], "all": [0.0, 2 / 3]}, "diversity": [0.9, 1 / 3],
            "phase_tokens": {"reasoning": 1, "answer": 1}}
    request = ChatRequest([Message("user", "x")])
    metrics.observe(request, Routing(0, "a", "answer", [], load))
    metrics.observe(request, Done("stop"))
    m = parsed(metrics)
    assert m["vllm:kv_cache_usage_perc"] == 0.25
    assert m["autoglm:routing_balancedness_window{layer=2,window=10}"] == pytest.approx(1 / 3)
    assert "autoglm:routing_balancedness_window{layer=0,window=all}" not in m  # "all" is routing_balancedness
    assert m["autoglm:routing_dead_experts_fraction{layer=2,window=all}"] == pytest.approx(2 / 3)
    assert m["autoglm:routing_expert_diversity{layer=0}"] == pytest.approx(0.9)
    assert m["autoglm:routed_tokens_total{phase=prefill}"] == 4
    assert m["autoglm:routed_tokens_total{phase=reasoning}"] == 1


def test_the_schema_documents_405_and_the_routed_experts_extension(live_server):
    schema = httpx.get(live_server + "/v1/openapi.json", timeout=30).json()
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/tokenize", "post")):
        assert "405" in schema["paths"][path][method]["responses"], path
    text = str(schema)
    assert "return_routed_experts" in text and "routed_experts" in text
