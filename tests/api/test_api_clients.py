"""Real clients against the live /v1 API on loopback: the ``openai`` SDK and LangChain's ``ChatOpenAI``."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import soundfile as sf
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from openai import OpenAI
from PIL import Image

from autoglm_app.events import Answer, EngineBusy, Error, Queued
from tests.api_helpers import THINKING_SCRIPT, ScriptedEngine, serve

MODEL = "autoglm-phone-9b"


@pytest.fixture(scope="session")
def base_url(engine):
    running = serve(engine)
    yield running.url + "/v1"
    running.stop()


@pytest.fixture(scope="session")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def thinking_url():
    """A server whose (scripted) engine always reasons, then answers."""
    running = serve(ScriptedEngine(THINKING_SCRIPT))
    yield running.url + "/v1"
    running.stop()


def image_url(color: str = "red") -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def recording(seconds: float = 0.6, rate: int = 22050) -> dict:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}


def ask(client: OpenAI, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=kw.pop("max_tokens", 8), temperature=0, **kw)


# ----------------------------------------------------------------------------- openai SDK


def test_openai_lists_the_models(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_openai_non_streaming_answers_with_usage(client):
    r = ask(client, "Who are you?")
    assert r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert isinstance(r.choices[0].message.model_extra["reasoning_content"], str)


def test_openai_streaming_yields_deltas_then_usage(client):
    chunks = list(ask(client, "Who are you?", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_openai_image_as_a_data_url(client):
    r = ask(client, [{"type": "text", "text": "What shape is this?"}, image_url()])
    assert r.usage.prompt_tokens > ask(client, "What shape is this?").usage.prompt_tokens  # the image counted


def test_openai_recording_as_input_audio(client):
    r = ask(client, [{"type": "text", "text": "What was said?"}, recording()])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > ask(client, "What was said?").usage.prompt_tokens  # the audio counted


def test_openai_reasoning_content_is_read_apart_from_the_answer(thinking_url):
    client = OpenAI(base_url=thinking_url, api_key="EMPTY", max_retries=0)
    message = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}]
                                             ).choices[0].message
    assert message.content == "A red square."
    assert getattr(message, "reasoning_content") == "Let me look."
    stream = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Let me look."
    assert "".join(d.content or "" for d in deltas) == "A red square."


def test_openai_reasoning_is_absent_when_not_asked_for(client):
    message = ask(client, "hi", extra_body={"return_reasoning": False}).choices[0].message
    assert getattr(message, "reasoning_content", None) is None


def test_openai_telemetry_is_shaped_as_documented_when_asked(client, small):
    rows, cols = small[1].grid
    r = ask(client, [{"type": "text", "text": "Where?"}, image_url()], max_tokens=5,
            extra_body={"return_focus": True, "return_routing": True})
    extra = r.choices[0].message.model_extra
    assert len(extra["focus"]) == len(extra["routing"]) == r.usage.completion_tokens == 5
    grid = np.array(extra["focus"][0][0]["grid"])
    assert grid.shape == (rows, cols) and (grid >= 0).all() and grid.sum() > 0
    assert r.model_extra["stats"]["completion_tokens"] == 5

    stream = ask(client, [{"type": "text", "text": "Where?"}, image_url()], max_tokens=5, stream=True,
                 extra_body={"return_focus": True})
    focus = [c.choices[0].delta.model_extra["focus"] for c in stream
             if c.choices and "focus" in (c.choices[0].delta.model_extra or {})]
    assert len(focus) == 5 and all(np.array(f[0]["grid"]).shape == (rows, cols) for f in focus)


def test_openai_telemetry_is_absent_when_not_asked(client):
    r = ask(client, [{"type": "text", "text": "Where?"}, image_url()], max_tokens=3)
    assert not {"focus", "routing"} & set(r.choices[0].message.model_extra)
    assert "stats" not in (r.model_extra or {})
    for c in ask(client, [{"type": "text", "text": "Where?"}, image_url()], max_tokens=3, stream=True):
        if c.choices:
            assert not {"focus", "routing"} & set(c.choices[0].delta.model_extra or {})


def test_openai_errors_map_to_sdk_exceptions(client, engine):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        ask(client, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="file"):
        ask(client, [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}])
    keyed = serve(engine, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=keyed.url + "/v1", api_key="EMPTY", max_retries=0).models.list()
        assert OpenAI(base_url=keyed.url + "/v1", api_key="sekret").models.list().data
    finally:
        keyed.stop()
    assert ask(client, "still there?").choices  # the server keeps serving


def test_openai_stream_raises_on_a_mid_stream_engine_error():
    running = serve(ScriptedEngine([Queued(0), Answer("par"), Error("out of memory", kind="internal")]))
    try:
        client = OpenAI(base_url=running.url + "/v1", api_key="EMPTY", max_retries=0)
        with pytest.raises(openai.APIError, match="out of memory"):
            for _ in client.chat.completions.create(model="scripted", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
                pass
    finally:
        running.stop()


def test_openai_busy_engine_is_a_rate_limit_error_with_retry_after(engine, monkeypatch, client):
    def busy(request):
        raise EngineBusy("the server is busy (16 requests waiting): retry in a few seconds", retry_after=3)

    monkeypatch.setattr(engine, "submit", busy)
    with pytest.raises(openai.RateLimitError) as info:
        ask(client, "hi")
    assert info.value.response.headers["retry-after"] == "3"


# ----------------------------------------------------------------------------- LangChain


def chat_model(base_url: str, **kw) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="EMPTY", model=MODEL, max_tokens=8, temperature=0,
                      max_retries=0, extra_body={"enable_thinking": True, "return_reasoning": True}, **kw)


def sdk_answer(client: OpenAI, content) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of the greedy answer through the openai SDK, thinking on as
    chat_model() asks: what LangChain must give back for the same question."""
    r = ask(client, content, extra_body={"enable_thinking": True, "return_reasoning": True})
    return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason


def test_langchain_invoke(base_url, client):
    text, tokens, finish = sdk_answer(client, "Who are you?")
    assert chat_model(base_url, streaming=True).invoke("Who are you?").content == text
    reply = chat_model(base_url).invoke("Who are you?")
    assert reply.content == text
    assert reply.usage_metadata["output_tokens"] == tokens >= 1
    assert reply.response_metadata["finish_reason"] == finish


def test_langchain_stream(base_url, client):
    text, _, finish = sdk_answer(client, "Who are you?")
    chunks = list(chat_model(base_url, streaming=True).stream("Who are you?"))
    assert len(chunks) >= 2
    assert "".join(c.content for c in chunks) == text
    assert [c.response_metadata["finish_reason"] for c in chunks if c.response_metadata.get("finish_reason")] \
        == [finish]


def test_langchain_with_an_image(base_url, client):
    content = [{"type": "text", "text": "What is this?"}, image_url()]
    text, _, _ = sdk_answer(client, content)
    assert chat_model(base_url).invoke([HumanMessage(content=content)]).content == text


def test_langchain_sees_only_the_answer_as_content(thinking_url):
    llm = ChatOpenAI(base_url=thinking_url, api_key="EMPTY", model="scripted", max_retries=0,
                     extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True)
    assert llm.invoke("hi").content == "A red square."
    assert "".join(c.content for c in llm.stream("hi")) == "A red square."
