"""OpenAI's logprobs through /v1, read with the real clients: the openai SDK (streamed and not) and LangChain."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.api.test_api_clients import MODEL, base_url, client, image_url  # noqa: F401 (base_url, client: fixtures)


def question(**kw) -> dict:
    kw.setdefault("max_tokens", 10)
    return dict(model=MODEL, messages=[{"role": "user", "content": [image_url("red"), {"type": "text",
                                                                                       "text": "What is it?"}]}],
                temperature=0, seed=1, **kw)


def test_the_sdk_reads_each_tokens_logprob_and_its_alternatives(client):
    r = client.chat.completions.create(**question(logprobs=True, top_logprobs=4))
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens  # every generated token (the reasoning's too)
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely is the one emitted
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert [a.logprob for a in entry.top_logprobs] == sorted((a.logprob for a in entry.top_logprobs),
                                                                 reverse=True)
        if "\ufffd" not in entry.token:
            assert bytes(entry.bytes) == entry.token.encode("utf-8")
    # the reasoning and the answer the client sees are the tokens' texts, in order
    text = "".join(e.token for e in content)
    assert r.choices[0].message.content in text
    assert (r.choices[0].message.reasoning_content or "") in text


def test_streamed_and_not_streamed_logprobs_agree(client):
    whole = client.chat.completions.create(**question(logprobs=True, top_logprobs=2)).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**question(logprobs=True, top_logprobs=2), stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in whole]
    for s, w in zip(streamed, whole):
        assert s.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert [a.token for a in s.top_logprobs] == [a.token for a in w.top_logprobs]


def test_logprobs_without_alternatives_and_none_when_not_asked(client):
    r = client.chat.completions.create(**question(logprobs=True))
    assert r.choices[0].logprobs.content and all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert client.chat.completions.create(**question()).choices[0].logprobs is None


def test_hidden_reasoning_hides_its_tokens_logprobs(client):
    shown = client.chat.completions.create(**question(logprobs=True, extra_body={"enable_thinking": True}))
    hidden = client.chat.completions.create(**question(logprobs=True, extra_body={"enable_thinking": True,
                                                                                   "return_reasoning": False}))
    assert hidden.choices[0].message.content == shown.choices[0].message.content
    assert len(hidden.choices[0].logprobs.content) <= len(shown.choices[0].logprobs.content)
    if shown.choices[0].message.reasoning_content:
        assert len(hidden.choices[0].logprobs.content) < len(shown.choices[0].logprobs.content)


@pytest.mark.parametrize("fields", [{"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1},
                                    {"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 3}])
def test_bad_top_logprobs_are_a_400_and_the_server_goes_on(client, fields):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**question(**fields))
    assert "top_logprobs" in str(err.value)
    assert client.chat.completions.create(**question(max_tokens=2)).choices[0].message is not None


def test_langchain_reads_the_logprobs(base_url):
    llm = ChatOpenAI(model=MODEL, base_url=base_url, api_key="EMPTY", temperature=0, max_tokens=6,
                     max_retries=0, timeout=60).bind(logprobs=True, top_logprobs=2)
    msg = llm.invoke("Who are you?")
    content = msg.response_metadata["logprobs"]["content"]
    assert content and all(len(e["top_logprobs"]) == 2 for e in content)
