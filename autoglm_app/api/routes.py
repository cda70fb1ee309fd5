"""HTTP routes of the OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /health``.

Thin by design: check the request (size, key, model name), convert it with ``protocol``,
submit it to the engine, and render the engine's event stream as one JSON response or
as server-sent events. The engine's blocking event generator is read in a worker
thread; when the client goes away, the request is cancelled so the engine is free.
Every error a client can cause leaves as an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Limits, Settings
from ..events import BadRequest, EngineBusy, Error, Event, Notice, Queued
from .media import MediaLimits
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkBuilder,
    CompletionBuilder,
    ModelCard,
    ModelList,
    bad_request,
    engine_error,
    to_chat_request,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = Limits().max_body_bytes
DEFAULT_MODEL_NAME = "autoglm-phone-9b"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def served_model_names(engine, settings: Settings) -> list[str]:
    """The names the API answers to: --served-model-name, else the loaded model's id and autoglm-phone-9b."""
    names = list(settings.served_model_names) or [engine.info()["model_id"], DEFAULT_MODEL_NAME]
    return list(dict.fromkeys(n for n in names if n))


def mount_api(app: FastAPI, engine, settings: Settings) -> None:
    """Add the /v1 routes, /health and the OpenAI-style error handlers to ``app``."""
    api = OpenAIRoutes(engine, settings)
    app.include_router(api.router)
    app.add_exception_handler(APIError, api_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)


# ----------------------------------------------------------------------------- error handlers


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


async def api_error_response(request: Request, exc: APIError) -> JSONResponse:
    log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc)
    return error_response(exc)


def is_api_path(request: Request) -> bool:
    return request.url.path.startswith("/v1")


async def validation_error_response(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's 422 becomes an OpenAI 400 on /v1; elsewhere (the UI) FastAPI's own answer stands."""
    if not is_api_path(request):
        return await request_validation_exception_handler(request, exc)
    return error_response(bad_request(describe_validation(exc.errors())))


async def http_error_response(request: Request, exc: StarletteHTTPException) -> Response:
    if not is_api_path(request):
        return await http_exception_handler(request, exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                   code=code, headers=dict(exc.headers or {})))


def describe_validation(errors: list[dict]) -> str:
    """Pydantic errors -> 'invalid request: messages.0.role: Input should be ...; ...'."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


# ----------------------------------------------------------------------------- request helpers


def too_large(what: str, limit: int) -> APIError:
    return APIError(413, f"the {what} is over {limit / 2**20:g} MiB: send smaller images or recordings",
                    code="request_too_large", headers={"Connection": "close"})


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON: send numbers as finite values")


async def read_json(request: Request, max_bytes: int | None = None) -> Any:
    """The request body as strict JSON (UTF-8, no NaN / Infinity), refusing bodies over ``max_bytes``
    (declared or actual)."""
    limit = MAX_BODY_BYTES if max_bytes is None else max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large("request body (Content-Length)", limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large("request body", limit)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8",
                          code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None


def parse_request(payload: Any) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        raise bad_request(describe_validation(e.errors())) from None


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to hang up, then cancel its request (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client went away: cancelling request %s", handle.id)
    handle.cancel()


async def engine_events(handle, request: Request) -> AsyncIterator[Event]:
    """The handle's events, read from its blocking generator in a worker thread.

    Leaving early (client gone, error, cancellation) cancels the engine request.
    """
    watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
    events = handle.events()
    finished = False
    try:
        while (event := await run_in_threadpool(next, events, None)) is not None:
            yield event
        finished = True
    finally:
        watcher.cancel()
        if not finished:
            handle.cancel()


async def first_events(events: AsyncIterator[Event]) -> list[Event]:
    """Read until the first event that is not Queued / Notice (or the end): what decides the status.

    An engine Error there (the prompt over the context, out of memory, shutting down) raises the
    APIError, so a stream that could not start is an HTTP error, not a 200 with an error event."""
    head: list[Event] = []
    async for event in events:
        head.append(event)
        if isinstance(event, Error):
            raise engine_error(event)
        if not isinstance(event, (Queued, Notice)):
            break
    return head


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


# ----------------------------------------------------------------------------- routes


class OpenAIRoutes:
    def __init__(self, engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.model_names = served_model_names(engine, settings)
        self.created = int(time.time())
        self.limits = MediaLimits.from_settings(settings)
        self.router = APIRouter()
        self.router.add_api_route("/health", self.health, methods=["GET"], include_in_schema=False)
        auth = [Depends(self.check_key)]
        self.router.add_api_route("/v1/models", self.list_models, methods=["GET"], dependencies=auth)
        self.router.add_api_route("/v1/models/{model_name:path}", self.get_model, methods=["GET"],
                                  dependencies=auth)
        self.router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                                  dependencies=auth, response_model=None)

    # ------------------------------------------------------------------ checks
    def check_key(self, request: Request) -> None:
        """Without --api-key any key (or none) is accepted; with one, 'Authorization: Bearer <key>' must match."""
        key = self.settings.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key: send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_ready(self) -> None:
        if self.engine is None or not self.engine.ready:
            raise APIError(503, "the model is not loaded yet (or the server is shutting down): retry shortly",
                           type="service_unavailable", code="model_not_ready", headers={"Retry-After": "5"})

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            return self.model_names[0]
        if name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist on this server: use one of "
                                f"{', '.join(self.model_names)} (see GET /v1/models)",
                           param="model", code="model_not_found")
        return name

    # ------------------------------------------------------------------ endpoints
    def health(self) -> JSONResponse:
        if self.engine is not None and self.engine.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})

    def card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created)

    def list_models(self) -> dict:
        return ModelList(data=[self.card(n) for n in self.model_names]).model_dump()

    def get_model(self, model_name: str) -> dict:
        return self.card(self.resolve_model(model_name)).model_dump()

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(await read_json(request, self.settings.limits.max_body_bytes))
        model = self.resolve_model(req.model)
        self.check_ready()
        chat = await run_in_threadpool(to_chat_request, req, self.settings.allow_remote_images, self.limits,
                                       self.settings.limits.max_images_per_turn)
        handle = await self.submit(chat)
        # never the messages themselves: no text, image or audio bytes in the logs
        log.info("request %s: model=%s stream=%s messages=%d images=%d recordings=%d session=%s", handle.id, model,
                 req.stream, len(chat.messages), sum(len(m.images) for m in chat.messages),
                 sum(len(m.audios) for m in chat.messages), chat.session_id)
        if req.stream:
            builder = ChunkBuilder(model=model, extras=req.extras(), include_usage=req.include_usage)
            events = engine_events(handle, request)
            try:
                head = await first_events(events)
            except BaseException:
                await events.aclose()
                raise
            return StreamingResponse(self.stream(head, events, builder, handle), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        builder = CompletionBuilder(model=model, extras=req.extras())
        async with aclosing(engine_events(handle, request)) as events:
            async for event in events:
                builder.add(event)
        return JSONResponse(builder.response().model_dump(exclude_none=True))

    async def submit(self, chat):
        try:
            return await run_in_threadpool(self.engine.submit, chat)
        except BadRequest as e:
            raise bad_request(str(e)) from None
        except EngineBusy as e:
            status, type_, code = ((429, "server_busy", "queue_full") if self.engine.ready
                                   else (503, "service_unavailable", "shutting_down"))
            raise APIError(status, str(e), type=type_, code=code,
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None

    async def stream(self, head: list[Event], events: AsyncIterator[Event], builder: ChunkBuilder,
                     handle) -> AsyncIterator[str]:
        """SSE lines: the role chunk, content / telemetry chunks, the final chunk(s), then [DONE].

        ``head`` holds the events already read (see ``first_events``). An engine error mid-stream
        goes out as an OpenAI error object in its own event.
        """
        try:
            yield sse(builder.first())
            async with aclosing(events):
                for event in head:
                    for chunk in builder.add(event):
                        yield sse(chunk)
                async for event in events:
                    for chunk in builder.add(event):
                        yield sse(chunk)
        except APIError as e:
            log.warning("request %s failed mid-stream: %s", handle.id, e)
            yield f"data: {e.body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
