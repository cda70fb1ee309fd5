"""RemoteEngine against a stand-in OpenAI-compatible server on loopback (the app's own /v1 on the small model)."""

from __future__ import annotations

import pytest
from PIL import Image

from autoglm_app.events import (
    Answer,
    BadRequest,
    ChatRequest,
    Done,
    Error,
    Focus,
    Message,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
)
from autoglm_app.engine.remote import RemoteEngine


@pytest.fixture(scope="module")
def upstream(engine):
    """The app's /v1 (API only) serving the random small AutoGLM: a stand-in for vLLM / SGLang."""
    from autoglm_app.config import Settings
    from autoglm_app.server import create_app, serve_in_thread

    running = serve_in_thread(create_app(engine, Settings(model="small", served_model_names=["upstream"]), ui=False))
    yield running.url + "/v1"
    running.stop()


@pytest.fixture(scope="module")
def remote(upstream):
    eng = RemoteEngine(upstream)
    yield eng
    eng.close()


def _request(**opts):
    image = Image.new("RGB", (64, 64), "red")
    options = Options(max_new_tokens=8, temperature=0, seed=1, **opts)
    return ChatRequest([Message("user", "what shape is this?", [image])], options, session_id="remote-test")


def _text(events):
    return ("".join(e.text for e in events if isinstance(e, Reasoning)),
            "".join(e.text for e in events if isinstance(e, Answer)))


def test_remote_stream_carries_the_same_reasoning_and_answer_as_the_local_engine(remote, engine):
    events = remote.run(_request())
    assert isinstance(events[0], Queued) and isinstance(events[-1], Done)
    assert isinstance(events[-2], Stats) and events[-2].completion_tokens > 0
    local = engine.run(_request())
    assert _text(events) == _text(local)
    assert any(_text(events))
    assert remote.model == "upstream"


def test_remote_engine_says_focus_and_routing_need_the_in_process_engine(remote):
    info = remote.info()
    assert info["focus"] is False and info["routing"] is False and "in-process" in info["reason"]
    events = remote.run(_request(focus=True, routing=True))
    assert not any(isinstance(e, (Focus, Routing)) for e in events)


def test_remote_reasoning_from_think_tags_when_the_server_does_not_split_it(upstream):
    """A server without a reasoning parser sends '<think>...</think>' in the content: the splitter separates it."""
    from types import SimpleNamespace

    from autoglm_app.engine.remote import RemoteEngine

    class FakeStream(list):
        def close(self):
            pass

    def chunk(content=None, finish=None):
        delta = SimpleNamespace(content=content, model_extra={})
        return SimpleNamespace(usage=None, choices=[SimpleNamespace(delta=delta, finish_reason=finish)])

    eng = RemoteEngine(upstream, model="m")
    pieces = ["<thi", "nk>two ", "sides</th", "ink>\n", "a square", None]
    eng.client.chat.completions.create = lambda **kw: FakeStream(
        [chunk(p) for p in pieces[:-1]] + [chunk(finish="stop")])
    try:
        events = eng.run(_request())
    finally:
        eng.close()
    assert _text(events) == ("two sides", "a square")
    assert events[-1] == Done("stop")


def test_unreachable_remote_server_gives_a_clear_error_event():
    from autoglm_app.server import free_port

    eng = RemoteEngine(f"http://127.0.0.1:{free_port()}/v1", model="m", timeout=5)
    try:
        events = eng.run(_request())
    finally:
        eng.close()
    assert isinstance(events[-1], Error) and "cannot reach" in events[-1].message


def test_remote_validates_before_sending(remote):
    with pytest.raises(BadRequest):
        remote.submit(ChatRequest([Message("assistant", "hi")]))


def test_app_api_forwards_through_the_remote_engine(remote):
    """The app's own /v1 in front of a RemoteEngine: an openai client gets reasoning and answer."""
    from openai import OpenAI

    from autoglm_app.config import Settings
    from autoglm_app.server import create_app, serve_in_thread

    running = serve_in_thread(create_app(remote, Settings(model="remote", served_model_names=["front"]), ui=False))
    try:
        client = OpenAI(base_url=running.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="front", messages=[{"role": "user", "content": "hello"}],
                                             max_tokens=6, temperature=0)
    finally:
        running.stop()
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0


def test_remote_engine_gets_every_limit_of_the_settings(upstream):
    """--max-image-pixels reaches a remote backend: an image the API accepts above the 40 MP default is
    not refused later by the RemoteEngine (it once kept its own default)."""
    from autoglm_app.config import parse_settings
    from autoglm_app.server import load_engine

    big = Image.new("L", (10_000, 5_000))  # 50 MP, over the default
    request = ChatRequest([Message("user", "what is this?", images=[big])], Options(max_new_tokens=2))
    default = load_engine(parse_settings(["--backend", "openai", "--base-url", upstream, "--model", "upstream"]))
    raised = load_engine(parse_settings(["--backend", "openai", "--base-url", upstream, "--model", "upstream",
                                         "--max-image-pixels", "60000000", "--max-images-per-turn", "1",
                                         "--context-limit", "4096", "--max-queue", "3"]))
    try:
        with pytest.raises(BadRequest, match="limit is 40,000,000"):
            default.submit(request)
        assert raised.limits.max_image_pixels == 60_000_000
        assert (raised.limits.max_images_per_turn, raised.limits.max_queue) == (1, 3)
        assert raised.info()["context_limit"] == 4096
        sent = {}

        def create(**kw):
            sent.update(kw)
            raise RuntimeError("stop here: the request was accepted and sent")

        raised.client.chat.completions.create = create
        events = raised.run(request)
        assert sent["messages"][0]["content"][0]["type"] == "image_url"  # validated and forwarded
        assert isinstance(events[-1], Error)
        with pytest.raises(BadRequest, match="limit is 1"):
            raised.submit(ChatRequest([Message("user", "two", images=[Image.new("RGB", (8, 8))] * 2)]))
    finally:
        default.close()
        raised.close()


def test_remote_logprobs_come_back_as_the_local_engines_without_ids(remote, engine):
    """Logprobs asked through the remote server (our own /v1 here) are the local engine's: the same tokens,
    log-probabilities and alternatives; the wire carries no token ids and no entropy."""
    from autoglm_app.events import Logprobs

    request = _request(logprobs=3)
    far = [e for e in remote.run(request) if isinstance(e, Logprobs)]
    near = [e for e in engine.run(request) if isinstance(e, Logprobs)]
    assert far and [e.token for e in far] == [e.token for e in near]
    assert [e.index for e in far] == list(range(len(far)))
    for f, n in zip(far, near):
        assert f.logprob == pytest.approx(n.logprob, abs=1e-5)
        assert [a.token for a in f.top] == [a.token for a in n.top]
        assert f.token_id == -1 and f.entropy is None and f.bytes == n.bytes
    assert not [e for e in remote.run(_request()) if isinstance(e, Logprobs)]  # none unless asked


def test_remote_refuses_a_branch(remote):
    import dataclasses

    with pytest.raises(BadRequest, match="in-process"):
        remote.submit(dataclasses.replace(_request(), continue_from=[1, 2]))


def test_a_server_that_refuses_logprobs_is_asked_without_them(upstream, monkeypatch):
    """The page asks every turn for logprobs; a server that answers 400 to them still answers (asked again
    without), and is not asked for them again."""
    import openai

    eng = RemoteEngine(upstream)
    real = eng.client.chat.completions.create
    calls = []

    def picky(**kw):
        calls.append("logprobs" in kw)
        if "logprobs" in kw:
            raise openai.BadRequestError("logprobs are not supported", response=httpx_response(), body=None)
        return real(**kw)

    monkeypatch.setattr(eng.client.chat.completions, "create", picky)
    try:
        for _ in range(2):
            events = eng.run(_request(logprobs=2))
            assert isinstance(events[-1], Done) and _text(events) != ("", "")
        assert calls == [True, False, False]
    finally:
        eng.close()


def httpx_response():
    import httpx

    return httpx.Response(400, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
