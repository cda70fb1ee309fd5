"""Honest refusals: OpenAI fields the server does not implement get a 400 naming the field; fields that
are safe to ignore are accepted. After every refusal the next good request is served."""

from __future__ import annotations

import pytest

from tests.api_helpers import assert_error, assert_serves, body, post, serve

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}

# (request fields, the param the 400 names, words its message must contain)
REFUSED = {
    "tools, tool_choice left out (auto)": ({"tools": [TOOL]}, "tools", "cannot call tools"),
    "tools with tool_choice auto": ({"tools": [TOOL], "tool_choice": "auto"}, "tools", "cannot call tools"),
    "tools with tool_choice required": ({"tools": [TOOL], "tool_choice": "required"}, "tools", "cannot call tools"),
    "tools with a named function": ({"tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}, "tools", "cannot call tools"),
    "tool_choice required without tools": ({"tool_choice": "required"}, "tool_choice", "'required'"),
    "legacy functions": ({"functions": [TOOL["function"]]}, "functions", "function calling"),
    "legacy function_call by name": ({"function_call": {"name": "f"}}, "function_call", "function calling"),
    "response_format json_object": ({"response_format": {"type": "json_object"}}, "response_format",
                                    "'json_object'"),
    "response_format json_schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, "response_format", '{"type": "text"}'),
    "logit_bias": ({"logit_bias": {"50256": -100}}, "logit_bias", "logit_bias is not supported"),
    "modalities with audio": ({"modalities": ["text", "audio"]}, "modalities", "audio output is not supported"),
    "audio output settings": ({"audio": {"voice": "alloy", "format": "wav"}}, "audio",
                              "audio output is not supported"),
    "n = 2": ({"n": 2}, "n", "n > 1 is not supported"),
}

ACCEPTED = {
    "tools with tool_choice none": {"tools": [TOOL], "tool_choice": "none"},
    "tool_choice none / auto without tools": {"tool_choice": "auto", "parallel_tool_calls": False},
    "response_format text": {"response_format": {"type": "text"}},
    "empty logit_bias": {"logit_bias": {}},
    "logprobs false, top_logprobs 0": {"logprobs": False, "top_logprobs": 0},
    "text modality only": {"modalities": ["text"]},
    "ignored hints": {"user": "u", "service_tier": "auto", "store": False, "metadata": {"k": "v"},
                      "frequency_penalty": 0.5, "presence_penalty": 0.1},
}


@pytest.fixture(scope="module")
def api_url(engine):
    running = serve(engine)
    yield running.url
    running.stop()


@pytest.mark.parametrize("fields, param, words", REFUSED.values(), ids=REFUSED.keys())
def test_an_unimplemented_field_is_a_400_naming_it_and_the_next_request_is_served(api_url, fields, param, words):
    err = assert_error(post(api_url, body(**fields)), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert words in err["message"]
    if param != "n":
        assert err["code"] == "unsupported_parameter"
    assert_serves(api_url)


@pytest.mark.parametrize("fields", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_fields_safe_to_ignore_are_accepted(api_url, fields):
    r = post(api_url, body(**fields))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_a_streamed_request_is_refused_before_the_stream_starts(api_url):
    r = post(api_url, body(stream=True, response_format={"type": "json_object"}))
    err = assert_error(r, 400, "unsupported_parameter")
    assert err["param"] == "response_format"
    assert r.headers["content-type"].startswith("application/json")
    assert_serves(api_url)


def test_a_refused_request_never_reaches_the_engine(api_url, submitted):
    assert_error(post(api_url, body(tools=[TOOL], tool_choice="required")), 400)
    assert submitted == []
