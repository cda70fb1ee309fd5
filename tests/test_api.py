"""The /v1 API over HTTP (httpx on loopback) and its wire format.

Live tests run the real engine on the small random model; the reasoning text and the
mid-stream error come from a scripted stand-in engine, since a random model neither
thinks on cue nor fails on cue.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from http.server import HTTPServer, SimpleHTTPRequestHandler
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from autoglm_app.api import media, routes
from autoglm_app.api.protocol import ChatCompletionRequest, ChunkBuilder, CompletionBuilder, Extras, to_chat_request
from autoglm_app.config import Settings
from autoglm_app.engine.worker import RequestHandle
from autoglm_app.events import (
    Answer,
    Done,
    EngineBusy,
    Error,
    Focus,
    LayerRoute,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
)
from autoglm_app.modeling.small import build_small
from autoglm_app.server import create_app, serve_in_thread

from tests.conftest import make_engine

# a prompt the small random model (seed 0) answers at length when decoding greedily
LONG_PROMPT = "The quick brown fox"


# ----------------------------------------------------------------------------- helpers


def png_bytes(width: int = 32, height: int = 24, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a 1x1 image's): cheap to send."""
    raw = bytearray(png_bytes(1, 1))
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(raw)


def audio_b64(fmt: str = "WAV", seconds: float = 0.5, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def body(**kw) -> dict:
    out = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "hi"}],
           "max_tokens": 4, "temperature": 0}
    out.update(kw)
    return out


def post(url: str, payload=None, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=30, **kw)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, JSON-decoded ('[DONE]' kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def assert_serves(url: str) -> None:
    r = post(url, body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def serve(engine, **settings):
    return serve_in_thread(create_app(engine, Settings(model="small", **settings), ui=False))


class ScriptedEngine:
    """Engine stand-in for wire-format tests: every request gets the same scripted events."""

    ready = True
    max_queue = 4

    def __init__(self, events: list):
        self.script = events
        self.requests = []

    def info(self) -> dict:
        return {"model_id": "scripted"}

    def submit(self, request) -> RequestHandle:
        self.requests.append(request)
        handle = RequestHandle(request, len(self.requests))
        for event in self.script:
            handle.put(event)
        return handle


def stats(**kw) -> Stats:
    base = dict(ttft_s=0.01, think_s=0.02, reasoning_tokens=3, answer_tokens=2, reasoning_tps=100.0,
                answer_tps=100.0, tokens_per_second=100.0, prompt_tokens=7, completion_tokens=5, queue_s=0.0,
                total_s=0.05, peak_memory={"cpu": 1}, finish_reason="stop", attention="sdpa+probe")
    return Stats(**{**base, **kw})


THINKING_SCRIPT = [Queued(0), Reasoning("Let me "), Reasoning("look."), Answer("A red "), Answer("square."),
                   stats(), Done("stop")]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def api_url(engine):
    running = serve(engine)
    yield running.url
    running.stop()


@pytest.fixture(scope="session")
def keyed_url(engine):
    running = serve(engine, api_key="sekret")
    yield running.url
    running.stop()


@pytest.fixture(scope="session")
def scripted():
    """(url, engine) of a server whose engine always thinks, then answers."""
    engine = ScriptedEngine(THINKING_SCRIPT)
    running = serve(engine)
    yield running.url, engine
    running.stop()


@pytest.fixture
def spy(engine, monkeypatch):
    """The real engine, recording every handle submitted to it."""
    handles: list[RequestHandle] = []
    submit = engine.submit

    def recording_submit(request):
        handle = submit(request)
        handles.append(handle)
        return handle

    monkeypatch.setattr(engine, "submit", recording_submit)
    return handles


# ----------------------------------------------------------------------------- endpoints


def test_health_is_ok_once_the_engine_is_ready(api_url):
    r = httpx.get(api_url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_health_is_503_while_the_engine_is_not_ready():
    engine = ScriptedEngine([])
    engine.ready = False
    running = serve(engine)
    try:
        assert httpx.get(running.url + "/health").status_code == 503
        assert_error(post(running.url, body(model="scripted")), 503, "model_not_ready")
    finally:
        running.stop()


def test_models_lists_the_model_id_and_the_default_name(api_url, engine):
    data = httpx.get(api_url + "/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [engine.info()["model_id"], "autoglm-phone-9b"]
    assert all(m["object"] == "model" for m in data["data"])


def test_served_model_names_replace_the_defaults(engine):
    running = serve(engine, served_model_names=["glm-a", "glm-b"])
    try:
        assert [m["id"] for m in httpx.get(running.url + "/v1/models").json()["data"]] == ["glm-a", "glm-b"]
        assert post(running.url, body(model="glm-b")).json()["model"] == "glm-b"
        assert_error(post(running.url, body(model="autoglm-phone-9b")), 404, "model_not_found")
    finally:
        running.stop()


def test_non_streamed_completion_has_the_openai_shape(api_url):
    data = post(api_url, body()).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "autoglm-phone-9b"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = data["usage"]
    assert u["prompt_tokens"] > 0 and 1 <= u["completion_tokens"] <= 4
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # reasoning is on by default, so its field is there (empty: the random model does not think)
    assert isinstance(choice["message"]["reasoning_content"], str)
    for extension in ("focus", "routing"):
        assert extension not in choice["message"]
    assert "stats" not in data


def test_streamed_completion_is_role_chunk_deltas_final_chunk_usage_then_done(api_url):
    with httpx.stream("POST", api_url + "/v1/chat/completions", timeout=30,
                      json=body(stream=True, stream_options={"include_usage": True})) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert all("finish_reason" not in c["choices"][0] for c in chunks[:-2])


def test_streamed_text_equals_the_non_streamed_text_for_greedy_decoding(api_url):
    whole = post(api_url, body(max_tokens=8)).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", api_url + "/v1/chat/completions", json=body(max_tokens=8, stream=True)) as r:
        chunks = [c for c in sse_events(r) if c != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert all("usage" not in c for c in chunks)


def test_thinking_switches_and_sampling_fields_reach_the_engine(api_url, spy):
    post(api_url, body(enable_thinking=False, top_p=0.5, top_k=7, seed=3, stop="x", max_completion_tokens=3,
                       repetition_penalty=1.1))
    post(api_url, body(chat_template_kwargs={"enable_thinking": False}, stop=["a", "b"]))
    post(api_url, body(user="alice"))
    first, second, third = (h.request for h in spy)
    o = first.options
    assert (o.enable_thinking, o.top_p, o.top_k, o.seed, o.stop, o.max_new_tokens, o.repetition_penalty) == \
        (False, 0.5, 7, 3, ["x"], 3, 1.1)
    assert second.options.enable_thinking is False and second.options.stop == ["a", "b"]
    assert third.options.enable_thinking is True and third.session_id == "alice"
    assert first.session_id != second.session_id  # a fresh session per request without `user`
    # nothing asked the engine for telemetry
    assert not any(h.request.options.focus or h.request.options.routing for h in spy)


def test_unknown_and_unsupported_openai_fields_are_ignored(api_url):
    r = post(api_url, body(n=1, user="u", frequency_penalty=0.5, presence_penalty=0.1, logit_bias={},
                           response_format={"type": "text"}, something_new=True))
    assert r.status_code == 200, r.text


def test_multi_turn_history_with_an_earlier_image_and_assistant_reasoning(api_url, spy):
    messages = [
        {"role": "system", "content": "You are terse."},
        user(text("What is this?"), image(data_url(png_bytes()))),
        {"role": "assistant", "content": [text("A red square.")], "reasoning_content": "It is red."},
        {"role": "user", "content": "And its colour?"},
    ]
    assert post(api_url, body(messages=messages)).status_code == 200
    sent = spy[-1].request.messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert len(sent[1].images) == 1 and sent[1].images[0].size == (32, 24)
    assert sent[2].text == "A red square."


def test_input_audio_wav_and_flac_are_decoded(api_url, spy):
    for fmt in ("wav", "flac"):
        part = {"type": "input_audio", "input_audio": {"data": audio_b64(fmt.upper()), "format": fmt}}
        r = post(api_url, body(messages=[user(text("What was said?"), part)]))
        assert r.status_code == 200, r.text
        assert len(spy[-1].request.messages[0].audios) == 1


# ----------------------------------------------------------------------------- telemetry


def test_focus_routing_and_stats_are_present_and_shaped_when_asked(api_url, small, spy):
    rows, cols = small[1].grid
    messages = [user(text("Where is it?"), image(data_url(png_bytes())), image(data_url(png_bytes(color="blue"))))]
    data = post(api_url, body(messages=messages, return_focus=True, return_routing=True)).json()
    assert spy[-1].request.options.focus and spy[-1].request.options.routing
    message = data["choices"][0]["message"]
    n_tokens = data["usage"]["completion_tokens"]
    assert len(message["focus"]) == n_tokens
    for token_focus in message["focus"]:
        assert [f["image_index"] for f in token_focus] == [0, 1]
        for f in token_focus:
            grid = np.array(f["grid"])
            assert grid.shape == (rows, cols) and (grid >= 0).all()
            assert isinstance(f["token"], str) and isinstance(f["index"], int)
    assert [r["index"] for r in message["routing"]] == list(range(n_tokens))
    layer = message["routing"][0]["layers"][0]
    assert set(layer) == {"layer", "experts", "weights"} and len(layer["experts"]) == len(layer["weights"]) == 2
    s = data["stats"]
    assert s["ttft_ms"] > 0 and s["tokens_per_second"] >= 0
    assert s["prompt_tokens"] == data["usage"]["prompt_tokens"] and s["completion_tokens"] == n_tokens
    assert "expert_load" in s


def test_streamed_telemetry_rides_on_each_tokens_delta(api_url, small):
    rows, cols = small[1].grid
    payload = body(messages=[user(text("Where?"), image(data_url(png_bytes())))], stream=True, max_tokens=6,
                   return_focus=True, return_routing=True)
    with httpx.stream("POST", api_url + "/v1/chat/completions", json=payload, timeout=30) as r:
        chunks = [c for c in sse_events(r) if c != "[DONE]"]
    token_chunks = [c for c in chunks if "focus" in c["choices"][0]["delta"]]
    assert [c["choices"][0]["delta"]["focus"][0]["index"] for c in token_chunks] == list(range(6))
    for c in token_chunks:
        delta = c["choices"][0]["delta"]
        (f,) = delta["focus"]  # one image: a list of one
        assert f["image_index"] == 0 and np.array(f["grid"]).shape == (rows, cols)
        assert delta["routing"]["index"] == f["index"]
        if "content" in delta:
            assert f["token"] == delta["content"] == delta["routing"]["token"]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length" and final["stats"]["completion_tokens"] == 6


def test_return_stats_alone_adds_only_stats(api_url):
    data = post(api_url, body(return_stats=True)).json()
    assert data["stats"]["prompt_tokens"] == data["usage"]["prompt_tokens"]
    assert "focus" not in data["choices"][0]["message"] and "routing" not in data["choices"][0]["message"]


# ----------------------------------------------------------------------------- reasoning (scripted engine)


def test_reasoning_goes_to_reasoning_content_and_the_answer_to_content(scripted):
    url, _ = scripted
    message = post(url, body(model="scripted")).json()["choices"][0]["message"]
    assert message["content"] == "A red square."
    assert message["reasoning_content"] == message["reasoning"] == "Let me look."


def test_return_reasoning_false_drops_the_reasoning_fields(scripted):
    url, _ = scripted
    message = post(url, body(model="scripted", return_reasoning=False)).json()["choices"][0]["message"]
    assert message["content"] == "A red square." and "reasoning_content" not in message
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json=body(model="scripted", return_reasoning=False, stream=True)) as r:
        deltas = [c["choices"][0]["delta"] for c in sse_events(r) if c != "[DONE]" and c["choices"]]
    assert not any("reasoning_content" in d for d in deltas)


def test_streamed_reasoning_deltas_come_before_the_answer(scripted):
    url, _ = scripted
    with httpx.stream("POST", url + "/v1/chat/completions", json=body(model="scripted", stream=True)) as r:
        deltas = [c["choices"][0]["delta"] for c in sse_events(r) if c != "[DONE]"]
    assert [d.get("reasoning_content") for d in deltas[1:3]] == ["Let me ", "look."]
    assert [d.get("content") for d in deltas[3:5]] == ["A red ", "square."]
    assert all("content" not in d for d in deltas[1:3])


def test_an_engine_error_mid_stream_becomes_an_error_event_then_done():
    engine = ScriptedEngine([Queued(0), Answer("par"), Error("the model fell over", kind="internal")])
    running = serve(engine)
    try:
        with httpx.stream("POST", running.url + "/v1/chat/completions", json=body(model="scripted", stream=True)) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["message"] == "the model fell over"
        assert events[-2]["error"]["code"] == "internal"
        assert_error(post(running.url, body(model="scripted")), 500, "internal")
    finally:
        running.stop()


def test_chunk_builder_holds_a_token_until_its_telemetry_arrives():
    b = ChunkBuilder(model="m", extras=Extras(focus=True, routing=True))
    grid = np.full((2, 2), 0.25)
    route = [LayerRoute(0, [1, 2], [0.6, 0.4])]
    out = b.add(Answer("a"))
    assert out == []  # held for its focus / routing
    out = b.add(Focus(0, "a", "answer", [grid], []))
    out += b.add(Routing(0, "a", "answer", route, {}))
    assert out == []
    out = b.add(Focus(1, "", "answer", [grid], []))  # a token with no text: telemetry only
    assert len(out) == 1
    delta = out[0].choices[0].delta
    assert delta.content == "a" and delta.focus[0].grid == grid.tolist() and delta.routing.index == 0
    out = b.add(Done("length"))
    assert out[0].choices[0].delta.content is None and out[0].choices[0].delta.focus[0].index == 1
    assert out[-1].choices[0].finish_reason == "length"


def test_completion_builder_without_telemetry_keeps_only_text():
    b = CompletionBuilder(model="m", extras=Extras(reasoning=False))
    for e in [Reasoning("r"), Answer("x"), Focus(0, "x", "answer", [np.ones((2, 2))], []),
              Routing(0, "x", "answer", [], {}), stats(), Done("length")]:
        b.add(e)
    data = b.response().model_dump(exclude_none=True)
    assert data["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "x"},
                                  "finish_reason": "length"}


def test_request_model_maps_thinking_switches_with_top_level_first():
    def thinking(**kw) -> bool:
        return ChatCompletionRequest(messages=[], **kw).options().enable_thinking

    assert thinking() is True
    assert thinking(chat_template_kwargs={"enable_thinking": False}) is False
    assert thinking(enable_thinking=True, chat_template_kwargs={"enable_thinking": False}) is True
    assert ChatCompletionRequest(messages=[]).options() == Options(focus=False, routing=False)


# ----------------------------------------------------------------------------- errors


BAD_REQUESTS = {
    "empty messages": body(messages=[]),
    "messages not a list": body(messages="hi"),
    "unknown role": body(messages=[{"role": "tool", "content": "x"}]),
    "unknown content part": body(messages=[user({"type": "video_url", "video_url": {"url": "x"}})]),
    "n > 1": body(n=2),
    "undecodable image": body(messages=[user(text("x"), image(data_url(b"not an image at all")))]),
    "bad base64 image": body(messages=[user(image("data:image/png;base64,@@@@"))]),
    "file URL": body(messages=[user(image("file:///etc/passwd"))]),
    "remote URL not allowed": body(messages=[user(image("http://127.0.0.1:9/cat.png"))]),
    "undecodable audio": body(messages=[user({"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF garbage").decode(), "format": "wav"}})]),
    "engine BadRequest: max_tokens 0": body(max_tokens=0),
    "engine BadRequest: last message not from the user": body(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
    "temperature not a number": body(temperature="hot"),
}


@pytest.mark.parametrize("payload", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_400_and_the_server_keeps_serving(api_url, payload):
    err = assert_error(post(api_url, payload), 400)
    assert err["type"] == "invalid_request_error"
    assert_serves(api_url)


def test_malformed_json_gets_400(api_url):
    r = httpx.post(api_url + "/v1/chat/completions", content=b'{"messages": [', timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_serves(api_url)


def test_media_errors_name_the_offending_part(api_url):
    payload = body(messages=[user(text("x"), image("file:///etc/passwd"))])
    assert assert_error(post(api_url, payload), 400)["param"] == "messages[0].content[1]"


def test_unknown_model_gets_404_model_not_found(api_url):
    err = assert_error(post(api_url, body(model="gpt-4o")), 404, "model_not_found")
    assert err["param"] == "model" and "autoglm-phone-9b" in err["message"]
    assert_error(httpx.get(api_url + "/v1/models/gpt-4o"), 404, "model_not_found")
    assert_serves(api_url)


def test_api_key_is_required_when_set(keyed_url):
    assert_error(post(keyed_url, body()), 401, "invalid_api_key")
    assert_error(post(keyed_url, body(), headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(httpx.get(keyed_url + "/v1/models"), 401)
    assert post(keyed_url, body(), headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert httpx.get(keyed_url + "/health").status_code == 200  # health needs no key


def test_any_key_is_accepted_without_an_api_key(api_url):
    assert post(api_url, body(), headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_declared_body_over_the_limit_gets_413_before_it_is_sent(api_url):
    host, port = urlsplit(api_url).hostname, urlsplit(api_url).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {routes.MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        reply = b""
        while piece := s.recv(65536):  # the server closes the connection after a 413
            reply += piece
    reply = reply.decode()
    head, _, payload = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(payload)["error"]["code"] == "request_too_large"
    assert_serves(api_url)


def test_actual_body_over_the_limit_gets_413_without_content_length(engine):
    running = serve(engine, max_body_mb=1 / 16)  # --max-body-mb: 64 KiB

    def chunked():  # no Content-Length: only the bytes read can tell
        yield json.dumps(body(messages=[{"role": "user", "content": "x" * 100_000}])).encode()

    try:
        r = httpx.post(running.url + "/v1/chat/completions", content=chunked(), timeout=10)
        assert_error(r, 413, "request_too_large")
        assert_serves(running.url)
    finally:
        running.stop()


def test_an_image_with_too_many_pixels_gets_413(api_url):
    payload = body(messages=[user(text("x"), image(data_url(huge_png_header(10_000, 10_000))))])
    err = assert_error(post(api_url, payload), 413, "media_too_large")
    assert "10000x10000" in err["message"]
    assert_serves(api_url)


def test_a_recording_over_the_media_limit_gets_413(engine):
    running = serve(engine, max_upload_mb=4096 / 2**20)  # --max-upload-mb: 4 KiB
    part = {"type": "input_audio", "input_audio": {"data": audio_b64(seconds=1.0), "format": "wav"}}
    try:
        assert_error(post(running.url, body(messages=[user(part)])), 413, "media_too_large")
        assert_serves(running.url)
    finally:
        running.stop()


def test_a_full_queue_gets_429_with_retry_after():
    engine = make_engine(*build_small(seed=0), max_queue=1)  # its own model: the session engine stays idle
    running = serve(engine)
    long = ChatCompletionRequest(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4000,
                                 temperature=0)
    handles = []
    try:
        handles.append(engine.submit(to_chat_request(long, False)))
        deadline = time.time() + 10
        while engine.queue_length() and time.time() < deadline:  # wait until it runs
            time.sleep(0.01)
        handles.append(engine.submit(to_chat_request(long, False)))  # waits: the queue is now full
        with pytest.raises(EngineBusy):
            engine.submit(to_chat_request(long, False))
        r = post(running.url, body())
        err = assert_error(r, 429, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1 and "busy" in err["message"]
        for h in handles:
            h.cancel()
        for h in handles:
            list(h.events(timeout=10))
        assert_serves(running.url)
    finally:
        for h in handles:
            h.cancel()
        running.stop()
        engine.close()


def test_client_disconnect_mid_stream_cancels_the_request(api_url, spy):
    payload = body(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4000, stream=True)
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", api_url + "/v1/chat/completions", json=payload) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(got) >= 3
        # leaving the block closes the connection mid-stream
    handle = spy[0]
    deadline = time.time() + 5
    while not handle.cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert handle.cancelled
    start = time.time()
    assert_serves(api_url)  # the engine is free again
    assert time.time() - start < 5


# ----------------------------------------------------------------------------- media (unit)


def test_remote_images_are_fetched_only_when_allowed(tmp_path):
    (tmp_path / "cat.png").write_bytes(png_bytes(20, 10))

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert media.load_image_url(url + "/cat.png", allow_remote=True).size == (20, 10)
        with pytest.raises(media.MediaError, match="turned off"):
            media.load_image_url(url + "/cat.png", allow_remote=False)
        with pytest.raises(media.MediaError, match="HTTP 404"):
            media.load_image_url(url + "/dog.png", allow_remote=True)
    finally:
        server.shutdown()


def test_data_urls_must_be_base64_images():
    assert media.load_image_url(data_url(png_bytes(5, 4)), allow_remote=False).size == (5, 4)
    with pytest.raises(media.MediaError, match="not an image"):
        media.load_image_url(data_url(b"abc", "text/plain"), allow_remote=False)
    with pytest.raises(media.MediaError, match="base64"):
        media.load_image_url("data:image/png,rawbytes", allow_remote=False)
