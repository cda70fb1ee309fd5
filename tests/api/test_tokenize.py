"""vLLM's /tokenize and /detokenize (at the root and under /v1): text prompts through the tokenizer,
chat messages counted as the engine prefills them, refusals, and the remote engine's 501."""

from __future__ import annotations

import httpx
import pytest

from autoglm_app.engine.remote import RemoteEngine
from tests.helpers import make_engine
from tests.api_helpers import (
    ScriptedEngine,
    assert_error,
    assert_serves,
    body,
    data_url,
    image,
    png_bytes,
    post,
    serve,
    text,
    user,
)

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def api_url(engine):
    running = serve(engine, context_limit=4096)
    yield running.url
    running.stop()


def tokenize(url: str, payload: dict, prefix: str = "") -> httpx.Response:
    return httpx.post(f"{url}{prefix}/tokenize", json=payload, timeout=30)


def detokenize(url: str, payload: dict, prefix: str = "") -> httpx.Response:
    return httpx.post(f"{url}{prefix}/detokenize", json=payload, timeout=30)


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_a_text_prompt_is_the_tokenizers_ids_and_detokenizes_back(api_url, small, prefix):
    tok = small[1].tokenizer
    r = tokenize(api_url, {"model": "autoglm-phone-9b", "prompt": PROMPT, "add_special_tokens": False}, prefix)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert data == {"count": len(expected), "max_model_len": 4096, "tokens": expected}
    assert len(expected) >= 2
    back = detokenize(api_url, {"model": "autoglm-phone-9b", "tokens": data["tokens"]}, prefix)
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": PROMPT}


def test_add_special_tokens_is_the_tokenizers_own_choice(api_url, small):
    tok = small[1].tokenizer
    with_special = tokenize(api_url, {"prompt": PROMPT}).json()["tokens"]  # vLLM's default: true
    assert with_special == tok(PROMPT, add_special_tokens=True)["input_ids"]


def test_chat_messages_count_what_the_engine_prefills(api_url):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    counted = tokenize(api_url, {"messages": messages}).json()
    served = post(api_url, body(messages=messages)).json()
    assert counted["count"] == served["usage"]["prompt_tokens"] == len(counted["tokens"])
    # the rendered chat prompt is longer than the bare text: template and generation prompt
    assert counted["count"] > tokenize(api_url, {"prompt": PROMPT, "add_special_tokens": False}).json()["count"]


def test_an_image_is_counted_as_the_engine_counts_it(api_url):
    messages = [user(text("What is this?"), image(data_url(png_bytes())))]
    plain = tokenize(api_url, {"messages": [user(text("What is this?"))]}).json()["count"]
    counted = tokenize(api_url, {"messages": messages}).json()["count"]
    served = post(api_url, body(messages=messages)).json()["usage"]["prompt_tokens"]
    assert counted == served and counted > plain + 4  # the image's patches sit in the prompt


def test_thinking_switch_changes_the_rendered_prompt_as_it_does_for_a_request(api_url):
    messages = [{"role": "user", "content": PROMPT}]
    off = tokenize(api_url, {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}).json()
    served = post(api_url, body(messages=messages, enable_thinking=False)).json()["usage"]["prompt_tokens"]
    assert off["count"] == served


REFUSED = {
    "return_token_strs": ({"prompt": PROMPT, "return_token_strs": True}, "return_token_strs"),
    "no generation prompt": ({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False},
                             "add_generation_prompt"),
    "continue the final message": ({"messages": [{"role": "user", "content": "hi"}],
                                    "continue_final_message": True}, "continue_final_message"),
    "special tokens on a chat": ({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True},
                                 "add_special_tokens"),
    "own chat template": ({"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ x }}"},
                          "chat_template"),
    "prompt missing": ({"model": "autoglm-phone-9b"}, "prompt"),
    "prompt not text": ({"prompt": 3}, "prompt"),
    "bad role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
}


@pytest.mark.parametrize("payload, param", REFUSED.values(), ids=REFUSED.keys())
def test_what_tokenize_cannot_answer_is_a_400_naming_the_field(api_url, payload, param):
    err = assert_error(tokenize(api_url, payload), 400)
    assert err["param"] == param
    assert_serves(api_url)


def test_a_conversation_the_engine_would_refuse_is_a_400(api_url):
    err = assert_error(tokenize(api_url, {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]}), 400)
    assert "last message must be from the user" in err["message"]
    assert_serves(api_url)


@pytest.mark.parametrize("tokens", [[-1], [10**9], [1, 2, 10**9]])
def test_ids_outside_the_vocabulary_are_a_400(api_url, small, tokens):
    err = assert_error(detokenize(api_url, {"tokens": tokens}), 400)
    assert f"0 to {len(small[1].tokenizer) - 1}" in err["message"]
    assert_serves(api_url)


def test_an_unknown_model_is_a_404(api_url):
    assert_error(tokenize(api_url, {"model": "gpt-4", "prompt": "x"}), 404, "model_not_found")
    assert_error(detokenize(api_url, {"model": "gpt-4", "tokens": [1]}), 404, "model_not_found")


def test_an_engine_without_a_tokenizer_answers_501():
    running = serve(ScriptedEngine([]))
    try:
        err = assert_error(tokenize(running.url, {"prompt": "x"}), 501, "tokenizer_not_available")
        assert err["type"] == "not_implemented"
    finally:
        running.stop()


def test_the_remote_engine_points_at_the_remote_servers_tokenize():
    remote = RemoteEngine("http://10.0.0.1:8000/v1", model="m")
    try:
        with pytest.raises(NotImplementedError, match=r"http://10\.0\.0\.1:8000/tokenize"):
            remote.tokenize("hi")
        with pytest.raises(NotImplementedError, match=r"http://10\.0\.0\.1:8000/detokenize"):
            remote.detokenize([1])
    finally:
        remote.close()


def test_tokenize_with_the_page_mounted(live_server, small):
    r = tokenize(live_server, {"prompt": PROMPT, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == small[1].tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    r = httpx.get(live_server + "/tokenize", timeout=30)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_openapi_documents_both_request_shapes_and_the_responses(api_url):
    schema = httpx.get(api_url + "/v1/openapi.json", timeout=30).json()
    for path in ("/tokenize", "/v1/tokenize"):
        op = schema["paths"][path]["post"]
        body_schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert body_schema == {"anyOf": [{"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                                         {"$ref": "#/components/schemas/TokenizeChatRequest"}]}
        assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/TokenizeResponse"}
        assert "501" in op["responses"]
    detok = schema["paths"]["/detokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert detok == {"$ref": "#/components/schemas/DetokenizeRequest"}
    components = schema["components"]["schemas"]
    assert {"prompt", "add_special_tokens"} <= set(components["TokenizeCompletionRequest"]["properties"])
    assert {"messages", "add_generation_prompt"} <= set(components["TokenizeChatRequest"]["properties"])
    assert set(components["TokenizeResponse"]["properties"]) == {"count", "max_model_len", "tokens"}
    assert set(components["DetokenizeResponse"]["properties"]) == {"prompt"}


def test_a_context_shorter_than_the_default_answer_length_still_tokenizes_messages(small):
    short = make_engine(*small, context_limit=64)  # under the default max_new_tokens (512)
    running = serve(short, context_limit=64)
    try:
        r = tokenize(running.url, {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["max_model_len"] == 64 and r.json()["count"] >= 3
    finally:
        running.stop()
        short.close()
