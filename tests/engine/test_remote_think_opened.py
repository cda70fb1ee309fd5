"""The remote backend with a chat template that opens the think block in the prompt (issue 20).

The remote engine cannot render the remote template: it asks the remote server's /tokenize (chat) and
/detokenize once per thinking switch whether the prompt ends with ``<think>``. A stand-in upstream here
streams the raw content (no reasoning parser) and says how its template ends; one without those routes
cannot tell, and the content is split as before. A server that splits the reasoning itself
(reasoning_content deltas) keeps its own split even when the prompt opened the block.
"""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm_app.engine.remote import RemoteEngine
from autoglm_app.events import Answer, ChatRequest, Message, Options, Reasoning
from autoglm_app.server import serve_in_thread

PROMPT_TAIL = {True: "<|im_start|>assistant\n<think>\n", False: "<|im_start|>assistant\n<think>\n\n</think>\n\n"}


def upstream_app(pieces: list[dict], tokenize: bool) -> tuple[FastAPI, dict]:
    """A stand-in OpenAI-compatible server: streams ``pieces`` as deltas; /tokenize + /detokenize if asked."""
    app, seen = FastAPI(), {"tokenize": [], "chat": 0}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        await request.json()
        seen["chat"] += 1

        def stream():
            for delta in pieces:
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "up",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            end = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "up",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    if tokenize:
        @app.post("/tokenize")
        async def tok(request: Request):
            req = await request.json()
            thinking = req["chat_template_kwargs"]["enable_thinking"]
            seen["tokenize"].append(thinking)
            return JSONResponse({"count": 2, "max_model_len": 512, "tokens": [1, int(thinking)]})

        @app.post("/detokenize")
        async def detok(request: Request):
            tokens = (await request.json())["tokens"]
            return JSONResponse({"prompt": PROMPT_TAIL[bool(tokens[-1])]})

    return app, seen


@pytest.fixture
def upstream():
    servers = []

    def start(pieces: list[dict], tokenize: bool = True):
        app, seen = upstream_app(pieces, tokenize)
        running = serve_in_thread(app)
        servers.append(running)
        return RemoteEngine(running.url + "/v1", model="up"), seen

    yield start
    for s in servers:
        s.stop()


def ask(remote: RemoteEngine, thinking: bool = True) -> tuple[str, str]:
    events = remote.run(ChatRequest([Message("user", "hi")], Options(enable_thinking=thinking, max_new_tokens=16)))
    return ("".join(e.text for e in events if isinstance(e, Reasoning)),
            "".join(e.text for e in events if isinstance(e, Answer)))


RAW = [{"content": "the reason"}, {"content": "ing</th"}, {"content": "ink>\n\nThe answer."}]


def test_raw_content_after_a_prompt_opened_block_starts_in_the_reasoning(upstream):
    remote, seen = upstream(RAW)
    try:
        assert ask(remote) == ("the reasoning", "The answer.")
        assert ask(remote) == ("the reasoning", "The answer.")
        assert seen["tokenize"] == [True]  # asked once per thinking switch, then kept
        assert remote.prompt_opens_think(True) is True
    finally:
        remote.close()


def test_thinking_off_follows_the_template_that_closed_the_block(upstream):
    remote, seen = upstream([{"content": "Red."}])
    try:
        assert ask(remote, thinking=False) == ("", "Red.")
        assert seen["tokenize"] == [False] and remote.prompt_opens_think(False) is False
    finally:
        remote.close()


def test_a_server_that_cannot_tell_is_split_as_before(upstream):
    remote, _ = upstream(RAW, tokenize=False)
    try:
        assert remote.prompt_opens_think(True) is None
        assert ask(remote) == ("", "the reasoning</think>\n\nThe answer.")  # unknowable here: said in the docs
    finally:
        remote.close()


def test_a_server_side_reasoning_parser_keeps_its_split_when_the_prompt_opened_the_block(upstream):
    remote, _ = upstream([{"reasoning_content": "the reasoning"}, {"content": "\n\nThe answer."}])
    try:
        assert ask(remote) == ("the reasoning", "The answer.")
    finally:
        remote.close()
