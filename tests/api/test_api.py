"""The /v1 API over HTTP (httpx on loopback) and its wire format.

Live tests run the real engine on the small random model; the reasoning text and the
mid-stream error come from a scripted stand-in engine, since a random model neither
thinks on cue nor fails on cue.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import HTTPServer, SimpleHTTPRequestHandler
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from autoglm_app.api import media
from autoglm_app.api.protocol import ChatCompletionRequest
from autoglm_app.api.builders import ChunkBuilder, CompletionBuilder, Extras
from autoglm_app.api.serving import to_chat_request, to_options
from autoglm_app.config import Limits
from autoglm_app.engine.handle import RequestHandle
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
)
from autoglm_app.modeling.small import build_small
from tests.api_helpers import (
    LONG_PROMPT,
    THINKING_SCRIPT,
    ScriptedEngine,
    assert_error,
    assert_serves,
    audio_b64,
    body,
    data_url,
    huge_png_header,
    image,
    png_bytes,
    post,
    serve,
    sse_events,
    stats,
    text,
    user,
)
from tests.helpers import make_engine


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


def test_thinking_switches_and_sampling_fields_reach_the_engine(api_url, submitted):
    post(api_url, body(enable_thinking=False, top_p=0.5, top_k=7, seed=3, stop="x", max_completion_tokens=3,
                       repetition_penalty=1.1))
    post(api_url, body(chat_template_kwargs={"enable_thinking": False}, stop=["a", "b"]))
    post(api_url, body(user="alice"))
    first, second, third = (h.request for h in submitted)
    o = first.options
    assert (o.enable_thinking, o.top_p, o.top_k, o.seed, o.stop, o.max_new_tokens, o.repetition_penalty) == \
        (False, 0.5, 7, 3, ["x"], 3, 1.1)
    assert second.options.enable_thinking is False and second.options.stop == ["a", "b"]
    assert third.options.enable_thinking is True and third.session_id == "alice"
    assert first.session_id != second.session_id  # a fresh session per request without `user`
    # nothing asked the engine for telemetry
    assert not any(h.request.options.focus or h.request.options.routing for h in submitted)


def test_unknown_and_unsupported_openai_fields_are_ignored(api_url):
    r = post(api_url, body(n=1, user="u", frequency_penalty=0.5, presence_penalty=0.1, logit_bias={},
                           response_format={"type": "text"}, something_new=True))
    assert r.status_code == 200, r.text


def test_multi_turn_history_with_an_earlier_image_and_assistant_reasoning(api_url, submitted):
    messages = [
        {"role": "system", "content": "You are terse."},
        user(text("What is this?"), image(data_url(png_bytes()))),
        {"role": "assistant", "content": [text("A red square.")], "reasoning_content": "It is red."},
        {"role": "user", "content": "And its colour?"},
    ]
    assert post(api_url, body(messages=messages)).status_code == 200
    sent = submitted[-1].request.messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert len(sent[1].images) == 1 and sent[1].images[0].size == (32, 24)
    assert sent[2].text == "A red square."


def test_input_audio_wav_and_flac_are_decoded(api_url, submitted):
    for fmt in ("wav", "flac"):
        part = {"type": "input_audio", "input_audio": {"data": audio_b64(fmt.upper()), "format": fmt}}
        r = post(api_url, body(messages=[user(text("What was said?"), part)]))
        assert r.status_code == 200, r.text
        assert len(submitted[-1].request.messages[0].audios) == 1


# ----------------------------------------------------------------------------- telemetry


def test_focus_routing_and_stats_are_present_and_shaped_when_asked(api_url, small, submitted):
    rows, cols = small[1].grid
    messages = [user(text("Where is it?"), image(data_url(png_bytes())), image(data_url(png_bytes(color="blue"))))]
    data = post(api_url, body(messages=messages, return_focus=True, return_routing=True)).json()
    assert submitted[-1].request.options.focus and submitted[-1].request.options.routing
    message = data["choices"][0]["message"]
    n_tokens = data["usage"]["completion_tokens"]
    assert len(message["focus"]) == n_tokens
    for token_focus in message["focus"]:
        assert [f["image_index"] for f in token_focus] == [0, 1]
        for f in token_focus:
            grid = np.array(f["grid"])
            assert grid.shape == (rows, cols) and (grid >= 0).all()
    # every image's map of a token carries that token, in generation order
    assert [{f["index"] for f in token_focus} for token_focus in message["focus"]] == [{i} for i in range(n_tokens)]
    assert [r["index"] for r in message["routing"]] == list(range(n_tokens))
    assert [token_focus[0]["token"] for token_focus in message["focus"]] == [r["token"] for r in message["routing"]]
    layer = message["routing"][0]["layers"][0]
    assert set(layer) == {"layer", "experts", "weights"} and len(layer["experts"]) == len(layer["weights"]) == 2
    s = data["stats"]
    assert s["ttft_ms"] > 0 and s["total_ms"] >= s["ttft_ms"]
    assert s["prompt_tokens"] == data["usage"]["prompt_tokens"] and s["completion_tokens"] == n_tokens
    assert s["expert_load"]["tokens"]["prefill"] == data["usage"]["prompt_tokens"]


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
        return to_options(ChatCompletionRequest(messages=[], **kw)).enable_thinking

    assert thinking() is True
    assert thinking(chat_template_kwargs={"enable_thinking": False}) is False
    assert thinking(enable_thinking=True, chat_template_kwargs={"enable_thinking": False}) is True
    assert to_options(ChatCompletionRequest(messages=[])) == Options(focus=False, routing=False)


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
    "engine BadRequest: min_tokens over max_tokens": body(max_tokens=4, min_tokens=5),
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
                  f"Content-Length: {Limits().max_body_bytes + 1}\r\n\r\n".encode())
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


def test_min_tokens_holds_end_of_text_back(api_url):
    """vLLM's min_tokens: the answer is at least that long (the random model's end-of-text held back)."""
    data = post(api_url, body(max_tokens=24, min_tokens=24, temperature=0)).json()
    assert data["usage"]["completion_tokens"] == 24 and data["choices"][0]["finish_reason"] == "length"


def test_a_full_queue_gets_429_with_retry_after():
    # its own model (the session engine stays idle), one slot: the second request waits, the third finds no room
    engine = make_engine(*build_small(seed=0), max_batch=1, max_queue=1)
    running = serve(engine)
    long = ChatCompletionRequest(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4000,
                                 temperature=0)
    handles = []
    try:
        handles.append(engine.submit(to_chat_request(long, Limits())))
        deadline = time.time() + 10
        while engine.queue_length() and time.time() < deadline:  # wait until it runs
            time.sleep(0.01)
        handles.append(engine.submit(to_chat_request(long, Limits())))  # waits: the queue is now full
        with pytest.raises(EngineBusy):
            engine.submit(to_chat_request(long, Limits()))
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


def test_client_disconnect_mid_stream_cancels_the_request(api_url, submitted):
    payload = body(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4000, stream=True)
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", api_url + "/v1/chat/completions", json=payload) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(got) >= 3
        # leaving the block closes the connection mid-stream
    handle = submitted[0]
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
        assert media.load_image_url(url + "/cat.png", allow_remote=True, limits=Limits()).size == (20, 10)
        with pytest.raises(media.MediaError, match="turned off"):
            media.load_image_url(url + "/cat.png", allow_remote=False, limits=Limits())
        with pytest.raises(media.MediaError, match="HTTP 404"):
            media.load_image_url(url + "/dog.png", allow_remote=True, limits=Limits())
    finally:
        server.shutdown()


def test_data_urls_must_be_base64_images():
    assert media.load_image_url(data_url(png_bytes(5, 4)), allow_remote=False, limits=Limits()).size == (5, 4)
    with pytest.raises(media.MediaError, match="not an image"):
        media.load_image_url(data_url(b"abc", "text/plain"), allow_remote=False, limits=Limits())
    with pytest.raises(media.MediaError, match="base64"):
        media.load_image_url("data:image/png,rawbytes", allow_remote=False, limits=Limits())


# ----------------------------------------------------------------------------- the typed body in the docs


def test_openapi_documents_the_chat_completions_request_body(api_url):
    doc = httpx.get(api_url + "/v1/openapi.json").json()
    post_op = doc["paths"]["/v1/chat/completions"]["post"]
    schema = post_op["requestBody"]["content"]["application/json"]["schema"]
    assert post_op["requestBody"]["required"] is True
    assert schema == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    components = doc["components"]["schemas"]
    request = components["ChatCompletionRequest"]
    assert request["required"] == ["messages"]
    assert {"model", "messages", "temperature", "max_tokens", "stream", "return_focus"} <= set(request["properties"])
    # every model the body refers to is there too (a message, its content parts)
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(request)
    assert {"#/components/schemas/ChatMessage", "#/components/schemas/StreamOptions"} <= refs
    assert all(ref.rsplit("/", 1)[1] in components for ref in refs)
    collect(components["ChatMessage"])
    assert {"#/components/schemas/TextPart", "#/components/schemas/ImagePart",
            "#/components/schemas/AudioPart"} <= refs
    assert all(ref.rsplit("/", 1)[1] in components for ref in refs)
    # the answers and the error object are documented as well
    responses = post_op["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "422" not in responses  # FastAPI's own validation answer is never sent on /v1


def test_a_wrong_field_is_an_openai_400_that_names_it(api_url):
    r = post(api_url, body(temperature="hot"))
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "invalid request: temperature: Input should be a valid number, unable to parse string as a number",
        "type": "invalid_request_error", "param": "temperature", "code": None}}
    err = assert_error(post(api_url, body(messages=[{"role": 7, "content": "hi"}])), 400)
    assert err["param"] == "messages[0].role" and err["message"].startswith("invalid request: messages.0.role: ")
    err = assert_error(post(api_url, body(messages=[{"role": "user", "content": 5}])), 400)
    assert err["param"] == "messages[0].content"  # not pydantic's union labels (content.str, content.list[...])
    assert assert_error(post(api_url, [body()]), 400)["param"] is None  # the body itself is wrong


# ----------------------------------------------------------------------------- events reach asyncio


SCRIPT = [Queued(1), Queued(0), Reasoning("r"), Answer("a"), Answer("b"), stats(), Done("stop")]


def produce(handle: RequestHandle, events: list, pause_s: float = 0.002) -> threading.Thread:
    """Put ``events`` from another thread, as the engine's worker does, pausing between them."""
    def run():
        for event in events:
            time.sleep(pause_s)
            handle.put(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_async_events_are_the_sync_events_woken_by_the_producer():
    import asyncio

    sync_handle = RequestHandle(None, 1)
    produce(sync_handle, SCRIPT)
    sync_events = list(sync_handle.events(timeout=5))

    async def consume() -> tuple[list, bool]:
        handle = RequestHandle(None, 2)
        handle.put(SCRIPT[0])  # one event before the consumer starts, the others while it waits
        produce(handle, SCRIPT[1:])
        got = [event async for event in handle.aevents()]
        return got, handle.cancelled

    async_events, cancelled = asyncio.run(asyncio.wait_for(consume(), 5))
    assert async_events == sync_events == SCRIPT
    assert not cancelled  # it ran to Done


def test_closing_the_async_iterator_early_cancels_the_request():
    import asyncio

    async def read_two_then_leave() -> RequestHandle:
        handle = RequestHandle(None, 1)
        produce(handle, SCRIPT)
        events = handle.aevents()
        got = [await anext(events), await anext(events)]
        assert got == SCRIPT[:2] and not handle.cancelled
        await events.aclose()
        return handle

    assert asyncio.run(asyncio.wait_for(read_two_then_leave(), 5)).cancelled

    async def cancelled_while_waiting() -> RequestHandle:
        handle = RequestHandle(None, 2)  # nothing is ever put: the consumer waits
        task = asyncio.create_task(anext(handle.aevents()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle

    assert asyncio.run(asyncio.wait_for(cancelled_while_waiting(), 5)).cancelled
