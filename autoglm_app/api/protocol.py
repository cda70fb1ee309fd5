"""The OpenAI wire format: request and response models, error objects, and events -> wire.

Nothing here does I/O. ``ChatCompletionRequest`` is what a client posts;
``to_chat_request`` turns it into the engine's ``ChatRequest``; ``CompletionBuilder``
(non-streaming) and ``ChunkBuilder`` (streaming) turn the engine's event stream into
a ``chat.completion`` or a sequence of ``chat.completion.chunk`` objects.

Extensions to the OpenAI format (all opt-in, absent unless asked for):
  * ``reasoning_content`` (and the same text in ``reasoning``) on messages and deltas,
    on by default, off with ``return_reasoning: false``;
  * ``focus`` / ``routing`` per generated token with ``return_focus`` / ``return_routing``;
  * ``stats`` (timings, throughput) with ``return_stats`` or ``return_routing``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..events import (
    Answer,
    ChatRequest,
    Done,
    Error,
    Event,
    Focus,
    Message,
    Options,
    Reasoning,
    Routing,
    Stats,
)
from ..config import Limits
from ..engine.inputs import clean_text
from .media import MediaError, MediaLimits, load_image_url, load_input_audio

# ----------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error the client caused (or must wait out), sent as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


ENGINE_ERROR_STATUS = {"bad_request": (400, "invalid_request_error"), "busy": (503, "server_busy"),
                       "cancelled": (499, "cancelled"), "internal": (500, "server_error"),
                       "out_of_memory": (503, "server_error")}
RETRY_AFTER = {"busy": "5", "out_of_memory": "1"}  # seconds, for the errors worth retrying


def engine_error(event: Error) -> APIError:
    status, type_ = ENGINE_ERROR_STATUS.get(event.kind, (500, "server_error"))
    headers = {"Retry-After": RETRY_AFTER[event.kind]} if event.kind in RETRY_AFTER else None
    return APIError(status, event.message, type=type_, code=event.kind, headers=headers)


# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str


class InputAudio(_Lenient):
    data: str
    format: str = "wav"


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None  # assistant reasoning_content is ignored


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None  # None: the first served name
    messages: list[ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # thinking: top level (LangChain extra_body) or chat_template_kwargs (vLLM clients)
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # telemetry extensions
    return_focus: bool = False
    return_routing: bool = False
    return_stats: bool = False

    @property
    def thinking(self) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", True))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def extras(self) -> Extras:
        return Extras(reasoning=self.return_reasoning is not False, focus=self.return_focus,
                      routing=self.return_routing, stats=self.return_stats or self.return_routing)

    def options(self) -> Options:
        if self.n not in (None, 1):
            what = "n > 1 is not supported" if self.n > 1 else f"n must be 1, got {self.n}"
            raise bad_request(f"{what}: leave n out (or send n=1) and repeat the request for more choices", param="n")
        o = Options(enable_thinking=self.thinking, focus=self.return_focus, routing=self.return_routing)
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                            ("repetition_penalty", self.repetition_penalty), ("seed", self.seed)):
            if value is not None:
                setattr(o, name, value)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None:
            o.max_new_tokens = max_tokens
        if self.stop is not None:
            o.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return o


def to_message(index: int, m: ChatMessage, allow_remote_images: bool, limits: MediaLimits | None = None,
               max_images: int = Limits.max_images_per_turn) -> Message:
    """One wire message -> the engine's Message, decoding its images and recordings."""
    role = "system" if m.role == "developer" else m.role
    if m.content is None or isinstance(m.content, str):
        return Message(role, m.content or "")
    n_images = sum(isinstance(part, ImagePart) for part in m.content)
    if n_images > max_images:  # refused before decoding any of them
        raise bad_request(f"{n_images} images in one turn (message {index}); the limit is {max_images}: "
                          "send fewer images per message", param=f"messages[{index}].content",
                          code="too_many_images")
    texts, images, audios = [], [], []
    for j, part in enumerate(m.content):
        param = f"messages[{index}].content[{j}]"
        try:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image_url(url, allow_remote_images, limits))
            else:
                audios.append(load_input_audio(part.input_audio.data, part.input_audio.format, limits))
        except MediaError as e:
            if e.too_large:
                raise APIError(413, str(e), param=param, code="media_too_large") from None
            raise bad_request(str(e), param=param, code=e.code or "invalid_media") from None
    if role != "user" and (images or audios):
        raise bad_request(f"only user messages may carry images or audio (message {index} is {m.role})",
                          param=f"messages[{index}].content")
    return Message(role, "\n".join(texts), images, audios)


def to_chat_request(req: ChatCompletionRequest, allow_remote_images: bool, limits: MediaLimits | None = None,
                    max_images: int = Limits.max_images_per_turn) -> ChatRequest:
    """The engine request for a wire request; raises APIError for what the client must fix."""
    if not req.messages:
        raise bad_request("messages is empty: send at least one user message", param="messages")
    options = req.options()
    messages = [to_message(i, m, allow_remote_images, limits, max_images) for i, m in enumerate(req.messages)]
    # the session id is logged: printable characters only (no newlines to forge log lines), 128 at most
    user = "".join(ch for ch in clean_text(req.user) if ch.isprintable()).strip()[:128] if req.user else ""
    session = user or f"api-{uuid.uuid4().hex[:12]}"
    return ChatRequest(messages=messages, options=options, session_id=session)


# ----------------------------------------------------------------------------- responses


class ImageFocus(BaseModel):
    """Where one generated token looked on one image: attention over its rows x cols patch grid."""

    token: str
    index: int  # position of the token among the generated tokens
    image_index: int  # which image of the conversation, in order of appearance
    grid: list[list[float]]


class LayerRouting(BaseModel):
    layer: int
    experts: list[int]
    weights: list[float]


class TokenRouting(BaseModel):
    token: str
    index: int
    layers: list[LayerRouting]


class CompletionStats(BaseModel):
    ttft_ms: float
    think_ms: float | None = None
    queue_ms: float
    total_ms: float
    tokens_per_second: float
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    answer_tokens: int
    peak_memory_bytes: dict[str, int]
    attention: str
    expert_load: dict | None = None  # the engine's running routing load, with return_routing


class TokenDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: TokenDetails | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None
    reasoning: str | None = None
    focus: list[list[ImageFocus]] | None = None  # one list per token, one entry per image
    routing: list[TokenRouting] | None = None  # one entry per token


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    stats: CompletionStats | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    focus: list[ImageFocus] | None = None  # this token, one entry per image
    routing: TokenRouting | None = None  # this token


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    stats: CompletionStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm-studio"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- events -> wire


@dataclass
class Extras:
    """Which non-OpenAI fields the client asked for."""

    reasoning: bool = True
    focus: bool = False
    routing: bool = False
    stats: bool = False


def image_focus(event: Focus) -> list[ImageFocus]:
    return [ImageFocus(token=event.token, index=event.index, image_index=i,
                       grid=np.round(np.asarray(grid, dtype=np.float64), 6).tolist())
            for i, grid in enumerate(event.images)]


def token_routing(event: Routing) -> TokenRouting:
    return TokenRouting(token=event.token, index=event.index,
                        layers=[LayerRouting(layer=r.layer, experts=list(r.experts), weights=[round(float(w), 5) for w in r.weights])
                                for r in event.layers])


def completion_stats(s: Stats, expert_load: dict | None) -> CompletionStats:
    return CompletionStats(
        ttft_ms=round(s.ttft_s * 1000, 3), think_ms=None if s.think_s is None else round(s.think_s * 1000, 3),
        queue_ms=round(s.queue_s * 1000, 3), total_ms=round(s.total_s * 1000, 3),
        tokens_per_second=round(s.tokens_per_second, 3), prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens, reasoning_tokens=s.reasoning_tokens, answer_tokens=s.answer_tokens,
        peak_memory_bytes=dict(s.peak_memory), attention=s.attention, expert_load=expert_load,
    )


def usage(s: Stats | None) -> Usage:
    if s is None:
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    return Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                 total_tokens=s.prompt_tokens + s.completion_tokens,
                 completion_tokens_details=TokenDetails(reasoning_tokens=s.reasoning_tokens))


def finish_reason(engine_reason: str) -> str:
    return "length" if engine_reason == "length" else "stop"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


@dataclass
class CompletionBuilder:
    """Collects one request's events into a non-streamed ``chat.completion``."""

    model: str
    extras: Extras
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    answer: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    focus: list[list[ImageFocus]] = field(default_factory=list)
    routing: list[TokenRouting] = field(default_factory=list)
    stats: Stats | None = None
    expert_load: dict | None = None
    finish: str = "stop"

    def add(self, event: Event) -> None:
        """Take one event; an engine Error raises APIError."""
        if isinstance(event, Answer):
            self.answer.append(event.text)
        elif isinstance(event, Reasoning):
            self.reasoning.append(event.text)
        elif isinstance(event, Focus) and self.extras.focus and event.images:
            self.focus.append(image_focus(event))
        elif isinstance(event, Routing) and self.extras.routing:
            self.routing.append(token_routing(event))
            self.expert_load = event.load
        elif isinstance(event, Stats):
            self.stats = event
        elif isinstance(event, Done):
            self.finish = finish_reason(event.finish_reason)
        elif isinstance(event, Error):
            raise engine_error(event)

    def response(self) -> ChatCompletion:
        reasoning = "".join(self.reasoning) if self.extras.reasoning else None
        message = ResponseMessage(
            content="".join(self.answer), reasoning_content=reasoning, reasoning=reasoning,
            focus=self.focus if self.extras.focus else None,
            routing=self.routing if self.extras.routing else None,
        )
        stats = completion_stats(self.stats, self.expert_load) if self.extras.stats and self.stats else None
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=[Choice(message=message, finish_reason=self.finish)],
                              usage=usage(self.stats), stats=stats)


@dataclass
class ChunkBuilder:
    """Turns one request's events into ``chat.completion.chunk`` objects, in order.

    Text deltas go out as they come. With focus or routing asked for, a token's chunk is
    held until its next event: the Focus / Routing records of the same token (which the
    engine emits right after the token's text) ride on that chunk's delta; a token with no
    text of its own (half a character, a think tag) gets a chunk with telemetry only.
    """

    model: str
    extras: Extras
    include_usage: bool = False
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    pending: Delta | None = None
    pending_index: int | None = None  # the token whose telemetry the pending delta carries
    stats: Stats | None = None
    expert_load: dict | None = None

    @property
    def holds_for_telemetry(self) -> bool:
        return self.extras.focus or self.extras.routing

    def chunk(self, delta: Delta, finish: str | None = None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra)

    def first(self) -> ChatCompletionChunk:
        return self.chunk(Delta(role="assistant", content=""))

    def add(self, event: Event) -> list[ChatCompletionChunk]:
        """Take one event; return the chunks now ready. An engine Error raises APIError."""
        out: list[ChatCompletionChunk] = []
        if isinstance(event, (Answer, Reasoning)):
            out += self.flush()
            if isinstance(event, Reasoning) and not self.extras.reasoning:
                return out
            text = event.text
            self.pending = (Delta(content=text) if isinstance(event, Answer)
                            else Delta(reasoning_content=text, reasoning=text))
            if not self.holds_for_telemetry:
                out += self.flush()
        elif isinstance(event, Focus) and self.extras.focus and event.images:
            out += self.attach(event.index, "focus", image_focus(event))
        elif isinstance(event, Routing) and self.extras.routing:
            self.expert_load = event.load
            out += self.attach(event.index, "routing", token_routing(event))
        elif isinstance(event, Stats):
            self.stats = event
        elif isinstance(event, Done):
            out += self.flush()
            out += self.finish(finish_reason(event.finish_reason))
        elif isinstance(event, Error):
            raise engine_error(event)
        return out

    def attach(self, index: int, name: str, value) -> list[ChatCompletionChunk]:
        out = []
        if self.pending is not None and (getattr(self.pending, name) is not None
                                         or self.pending_index not in (None, index)):
            out = self.flush()
        if self.pending is None:
            self.pending = Delta()
        setattr(self.pending, name, value)
        self.pending_index = index
        return out

    def flush(self) -> list[ChatCompletionChunk]:
        delta, self.pending, self.pending_index = self.pending, None, None
        return [self.chunk(delta)] if delta is not None else []

    def finish(self, reason: str) -> list[ChatCompletionChunk]:
        stats = completion_stats(self.stats, self.expert_load) if self.extras.stats and self.stats else None
        out = [self.chunk(Delta(), finish=reason, stats=stats)]
        if self.include_usage:
            out.append(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                           usage=usage(self.stats)))
        return out
