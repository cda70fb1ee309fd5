"""HTTP routes of the OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /health``,
and vLLM's ``POST /tokenize`` / ``/detokenize`` (also under /v1).

Thin by design: check the request (key, body size, strict JSON, the ``protocol`` model, model
name), convert it with ``serving``, submit it to the engine, and render the engine's event stream
as one JSON response or as server-sent events. The route reads the stream with
``RequestHandle.aevents()``: the engine wakes the event loop, no thread sits in between. When the
client goes away, the request is cancelled so the engine is free. Every error a client can cause
leaves as an OpenAI error object, an unknown /v1 path or a wrong method too (``unrouted``, also with
the page mounted at "/"). The request body is read here (so the size limit holds before
it is all read) and documented in ``/v1/openapi.json`` as ``ChatCompletionRequest``.
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
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

from ..config import DEFAULT_MODEL_NAME, Settings
from ..events import BadRequest, EngineBusy, Error, Event, Notice, Queued
from .protocol import (
    APIError,
    AudioPart,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ImagePart,
    ImageURL,
    InputAudio,
    ModelCard,
    ModelList,
    StreamOptions,
    TextPart,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    bad_request,
)
from .builders import ChunkBuilder, CompletionBuilder, Extras, engine_error, sse
from .serving import check_tokenize, to_chat_request, to_messages

log = logging.getLogger(__name__)

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
    app.add_exception_handler(ClientDisconnect, client_gone_response)
    document_schemas(app, ChatCompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest)


# ----------------------------------------------------------------------------- error handlers


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


async def api_error_response(request: Request, exc: APIError) -> JSONResponse:
    log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc)
    return error_response(exc)


async def client_gone_response(request: Request, exc: ClientDisconnect) -> Response:
    """The client hung up before its request body was read (the load test's raw disconnects do): nothing was
    submitted and nobody reads an answer; an info line, not the ASGI traceback uvicorn logs as an ERROR."""
    log.info("%s %s: the client went away before its request was read", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; the connection is gone


ROOT_API_PATHS = ("/health", "/tokenize", "/detokenize")  # the API's routes outside /v1
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def is_api_path(request: Request) -> bool:
    path = request.url.path
    return path == "/v1" or path.startswith("/v1/") or path in ROOT_API_PATHS


def allowed_methods(request: Request, routes: list) -> list[str]:
    """The methods ``routes`` serve at this request's path (a route that matches the path but not the
    method is Starlette's partial match); empty when none has the path."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and getattr(route.endpoint, "__name__", "") != "unrouted":
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                methods |= route.methods or set()
    return sorted(methods)


def unrouted_error(request: Request, routes: list) -> APIError:
    """An API path no route serves (404 ``not_found``), or a wrong method on one (405
    ``method_not_allowed``, with ``Allow``)."""
    allowed = allowed_methods(request, routes)
    if allowed:
        return APIError(405, f"{request.method} {request.url.path}: method not allowed; use {', '.join(allowed)}",
                        code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    return APIError(404, f"{request.method} {request.url.path}: no such endpoint (see /v1/docs)", code="not_found")


async def validation_error_response(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's 422 becomes an OpenAI 400 on /v1; elsewhere (the UI) FastAPI's own answer stands."""
    if not is_api_path(request):
        return await request_validation_exception_handler(request, exc)
    return error_response(validation_error(exc.errors()))


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


FIELD_NAMES = frozenset(name for model in (ChatCompletionRequest, ChatMessage, TextPart, ImagePart, ImageURL,
                                            InputAudio, AudioPart, StreamOptions, TokenizeCompletionRequest,
                                            TokenizeChatRequest, DetokenizeRequest) for name in model.model_fields)


def error_param(errors: list[dict]) -> str | None:
    """The field the first error is about, written as the media errors write it ('messages[0].role'):
    its location up to the first part that is not a field name (pydantic's union labels)."""
    param = ""
    for part in errors[0].get("loc", ()) if errors else ():
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in FIELD_NAMES:
            param += f".{part}" if param else part
        elif part != "body":
            break
    return param or None


def validation_error(errors: list[dict]) -> APIError:
    return bad_request(describe_validation(errors), param=error_param(errors))


# ----------------------------------------------------------------------------- request helpers


def too_large(what: str, limit: int) -> APIError:
    return APIError(413, f"the {what} is over {limit / 2**20:g} MiB: send smaller images or recordings",
                    code="request_too_large", headers={"Connection": "close"})


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON: send numbers as finite values")


async def read_json(request: Request, limit: int) -> Any:
    """The request body as strict JSON (UTF-8, no NaN / Infinity), refusing a body over ``limit`` bytes
    from its Content-Length, or else as soon as more has been read."""
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


def parse_request(payload: Any, model: type[BaseModel] = ChatCompletionRequest) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def parse_tokenize(payload: Any) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """A /tokenize body: chat messages when it has ``messages``, else a text ``prompt`` (vLLM's two shapes)."""
    chat = isinstance(payload, dict) and "messages" in payload
    return parse_request(payload, TokenizeChatRequest if chat else TokenizeCompletionRequest)


def document_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add ``models`` (and the models they use) to the app's OpenAPI components, so a route that reads
    its body itself can still point its requestBody at them (see OpenAIRoutes)."""
    schemas = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}), **{model.__name__: schema})
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            build().setdefault("components", {}).setdefault("schemas", {}).update(schemas)
        return app.openapi_schema

    app.openapi = openapi


def json_body(*models: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route whose JSON body is ``model`` (or any of ``models``), listed by
    ``document_schemas``."""
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in models]
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}}}


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "invalid request (the error's param names the field)"), (401, "invalid or missing API key"),
    (404, "unknown model"), (413, "request body or media over the limits"), (429, "queue full: retry after"),
    (503, "model not ready, or out of memory"))}
# a wrong method on a served path (``unrouted``): documented on every route, with its Allow header
METHOD_NOT_ALLOWED = {405: {"model": ErrorResponse, "description": "method not allowed on this path",
                            "headers": {"Allow": {"description": "the methods this path serves",
                                                  "schema": {"type": "string"}}}}}
ERRORS.update(METHOD_NOT_ALLOWED)


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to hang up, then cancel its request (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client went away: cancelling request %s", handle.id)
    handle.cancel()


async def engine_events(handle, request: Request) -> AsyncIterator[Event]:
    """The handle's events as the engine puts them (``aevents``: no thread in between), while a
    watcher cancels the request if the client hangs up. Leaving early (client gone, error,
    cancellation) cancels the engine request."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
    try:
        async with aclosing(handle.aevents()) as events:
            async for event in events:
                yield event
    finally:
        watcher.cancel()


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


# ----------------------------------------------------------------------------- routes


class OpenAIRoutes:
    def __init__(self, engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.model_names = served_model_names(engine, settings)
        self.created = int(time.time())
        self.limits = settings.limits
        self.router = APIRouter()
        self.router.add_api_route("/health", self.health, methods=["GET"], include_in_schema=False)
        auth = [Depends(self.check_key)]
        self.router.add_api_route("/v1/models", self.list_models, methods=["GET"], dependencies=auth,
                                  responses=METHOD_NOT_ALLOWED)
        self.router.add_api_route("/v1/models/{model_name:path}", self.get_model, methods=["GET"],
                                  dependencies=auth, responses=METHOD_NOT_ALLOWED)
        body = Depends(self.read_request)

        async def chat_completions(request: Request, req: ChatCompletionRequest = body) -> Response:
            return await self.chat_completions(request, req)

        self.router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                                  dependencies=auth, response_model=None, openapi_extra=json_body(
                                      ChatCompletionRequest), responses={200: {
                                          "model": ChatCompletion, "description": "the completion, or with "
                                          "stream: true server-sent chat.completion.chunk events"}, **ERRORS})
        tokenizer_errors = {**ERRORS, 501: {"model": ErrorResponse, "description": "the engine has no tokenizer "
                                            "here (the remote backend: ask the remote server)"}}
        for prefix in ("", "/v1"):  # vLLM serves them at the root; /v1 for clients with one base URL
            self.router.add_api_route(prefix + "/tokenize", self.tokenize, methods=["POST"], dependencies=auth,
                                      response_model=TokenizeResponse, responses=tokenizer_errors,
                                      openapi_extra=json_body(TokenizeCompletionRequest, TokenizeChatRequest))
            self.router.add_api_route(prefix + "/detokenize", self.detokenize, methods=["POST"],
                                      dependencies=auth, response_model=DetokenizeResponse,
                                      responses=tokenizer_errors, openapi_extra=json_body(DetokenizeRequest))
        for path in ("/v1", "/v1/{rest:path}", *ROOT_API_PATHS):  # last: what the routes above leave
            self.router.add_api_route(path, self.unrouted, methods=ANY_METHOD, include_in_schema=False)

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
    async def unrouted(self, request: Request) -> Response:
        """What the API's routes leave under /v1 (and at /health, /tokenize, /detokenize): an OpenAI 404 / 405.

        Added last, for every method, so it answers only what the routes before it do not. With the
        page mounted at "/" the page's app would otherwise take these requests and answer its own
        ``{"detail": "Not Found"}``; a /v1 route added to the app after ``mount_api`` would be shadowed."""
        exc = unrouted_error(request, self.router.routes)
        log.info("%s %s -> %d", request.method, request.url.path, exc.status)
        return error_response(exc)

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

    async def read_request(self, request: Request) -> ChatCompletionRequest:
        """The body as a ChatCompletionRequest: size-limited, strict JSON, then the pydantic model."""
        return parse_request(await read_json(request, self.limits.max_body_bytes))

    async def chat_completions(self, request: Request, req: ChatCompletionRequest) -> Response:
        model = self.resolve_model(req.model)
        self.check_ready()
        chat = await run_in_threadpool(to_chat_request, req, self.limits, self.settings.allow_remote_images)
        handle = await self.submit(chat)
        # never the messages themselves: no text, image or audio bytes in the logs
        log.info("request %s: model=%s stream=%s messages=%d images=%d recordings=%d session=%s", handle.id, model,
                 req.stream, len(chat.messages), sum(len(m.images) for m in chat.messages),
                 sum(len(m.audios) for m in chat.messages), chat.session_id)
        if req.stream:
            builder = ChunkBuilder(model=model, extras=Extras.of(req), include_usage=req.include_usage)
            events = engine_events(handle, request)
            try:
                head = await first_events(events)
            except BaseException:
                await events.aclose()
                raise
            return StreamingResponse(self.stream(head, events, builder, handle), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        builder = CompletionBuilder(model=model, extras=Extras.of(req))
        async with aclosing(engine_events(handle, request)) as events:
            async for event in events:
                builder.add(event)
        return JSONResponse(builder.response().model_dump(exclude_none=True))

    async def tokenize(self, request: Request) -> TokenizeResponse:
        """vLLM's /tokenize: a text ``prompt`` through the tokenizer, or ``messages`` as the engine would
        prefill them (images and recordings counted as the engine counts them; see ``Engine.tokenize``)."""
        req = parse_tokenize(await read_json(request, self.limits.max_body_bytes))
        self.resolve_model(req.model)
        self.check_ready()
        check_tokenize(req)
        if isinstance(req, TokenizeCompletionRequest):
            ids = await self.tokenizer_call("tokenize", req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            messages = await run_in_threadpool(to_messages, req.messages, self.limits,
                                               self.settings.allow_remote_images)
            ids = await self.tokenizer_call("tokenize", messages, enable_thinking=req.thinking)
        return TokenizeResponse(count=len(ids), max_model_len=self.limits.context_limit, tokens=ids)

    async def detokenize(self, request: Request) -> DetokenizeResponse:
        req = parse_request(await read_json(request, self.limits.max_body_bytes), DetokenizeRequest)
        self.resolve_model(req.model)
        self.check_ready()
        return DetokenizeResponse(prompt=await self.tokenizer_call("detokenize", req.tokens))

    async def tokenizer_call(self, name: str, *args, **kwargs):
        """``engine.tokenize`` / ``engine.detokenize`` in the thread pool: BadRequest -> 400; an engine
        without a tokenizer here (NotImplementedError, or no such method) -> 501."""
        method = getattr(self.engine, name, None)
        try:
            if method is None:
                raise NotImplementedError(f"this engine cannot {name}")
            return await run_in_threadpool(method, *args, **kwargs)
        except BadRequest as e:
            raise bad_request(str(e)) from None
        except NotImplementedError as e:
            raise APIError(501, str(e), type="not_implemented", code="tokenizer_not_available") from None

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
