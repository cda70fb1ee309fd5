"""Serving: the wire request -> the engine's ``ChatRequest``, and the engine's events -> the wire.

``to_chat_request`` converts a ``ChatCompletionRequest`` (decoding its media with ``media``);
``CompletionBuilder`` (non-streaming) and ``ChunkBuilder`` (streaming) turn one request's event
stream into a ``chat.completion`` or a sequence of ``chat.completion.chunk`` objects.

Checks live in one place each. Here, at the edge, only what the engine's request cannot express
or what must be refused before any image or recording is decoded: the OpenAI fields this server
does not implement (``refuse_unsupported``: tools, response_format, logit_bias, audio output),
``top_logprobs`` without ``logprobs`` or over 20, ``n``, media on a message that is not the user's, images per turn (before decoding any),
and through ``media`` the bytes, pixels and seconds read from base64 lengths and headers.
Everything else (ranges of the options, roles, text, the decoded media themselves, the context) is
the engine's ``validate_request``.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from ..config import Limits
from ..engine.inputs import clean_text
from ..events import (
    Answer,
    ChatRequest,
    Done,
    Error,
    Event,
    MAX_TOP_LOGPROBS,
    Focus,
    Logprobs,
    Message,
    Options,
    Reasoning,
    Routing,
    Stats,
    routed_experts_array,
)
from .media import MediaError, load_image_url, load_input_audio
from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionStats,
    Delta,
    ImageFocus,
    ImagePart,
    LayerRouting,
    ResponseMessage,
    TextPart,
    TokenDetails,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenLogprob,
    TokenRouting,
    TopLogprob,
    Usage,
    bad_request,
)

# ----------------------------------------------------------------------------- wire -> engine


def unsupported(param: str, message: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """Refuse the OpenAI fields this server does not implement, by name, rather than answer as if it had.

    The model cannot call tools (``tools`` is refused unless ``tool_choice`` is "none", which asks for no
    call), writes text only (no JSON mode, no audio output), and the sampler has no logit bias and
    returns no log-probabilities. ``n`` is refused in ``to_options``. Fields that change nothing a client
    relies on (``user``, ``parallel_tool_calls``, ``service_tier``, ...) are ignored (README: request fields).
    """
    choice = req.tool_choice
    if req.tools and choice != "none":
        raise unsupported("tools", "tools are not supported: this model cannot call tools; leave tools out "
                                   '(or send tool_choice "none" to have them ignored)')
    if choice is not None and choice not in ("none", "auto"):
        raise unsupported("tool_choice", f"tool_choice {json_text(choice)} asks for a tool call, which this "
                                         'model cannot make: leave it out or send "none"')
    if req.functions or (req.function_call is not None and req.function_call not in ("none", "auto")):
        param = "functions" if req.functions else "function_call"
        raise unsupported(param, "function calling is not supported: this model cannot call functions; "
                                 "leave functions and function_call out")
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported("response_format", f"response_format {req.response_format.type!r} is not supported: "
                                             'the answer is plain text only; leave it out or send {"type": "text"}')
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias is not supported: leave it out (or send {}); "
                                        "temperature, top_p, top_k, repetition_penalty and stop are")
    if req.audio is not None or "audio" in (req.modalities or []):
        param = "audio" if req.audio is not None else "modalities"
        raise unsupported(param, 'audio output is not supported: the model answers in text; send modalities '
                                 '["text"] (or leave it out) and no audio field. Audio input (input_audio '
                                 "content parts) is supported")


def json_text(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def to_options(req: ChatCompletionRequest) -> Options:
    """The engine's options for a request; the fields left out keep the engine's defaults."""
    if req.n not in (None, 1):
        what = "n > 1 is not supported" if req.n > 1 else f"n must be 1, got {req.n}"
        raise bad_request(f"{what}: leave n out (or send n=1) and repeat the request for more choices", param="n")
    o = Options(enable_thinking=req.thinking, focus=req.return_focus,
                routing=req.return_routing or req.return_routed_experts, logprobs=to_logprobs(req))
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if (value := getattr(req, name)) is not None:
            setattr(o, name, value)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None:
        o.max_new_tokens = max_tokens
    if req.min_tokens is not None:
        o.min_new_tokens = req.min_tokens
    if req.stop is not None:
        o.stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return o


def to_logprobs(req: ChatCompletionRequest) -> int | None:
    """The engine's ``Options.logprobs`` (alternatives per token; None = off) from OpenAI's pair of fields."""
    top = req.top_logprobs
    if top is not None and not (isinstance(top, int) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad_request(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}",
                          param="top_logprobs")
    if not req.logprobs:
        if top:
            raise bad_request("top_logprobs needs logprobs: send logprobs=true with it", param="top_logprobs")
        return None
    return top or 0


def wire_logprob(event: Logprobs) -> TokenLogprob:
    return TokenLogprob(token=event.token, logprob=event.logprob, bytes=list(event.bytes),
                        top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.bytes))
                                      for a in event.top])


def to_message(index: int, m: ChatMessage, allow_remote_images: bool, limits: Limits) -> Message:
    """One wire message -> the engine's Message, decoding its images and recordings."""
    role = "system" if m.role == "developer" else m.role
    if m.content is None or isinstance(m.content, str):
        return Message(role, m.content or "")
    where = f"messages[{index}].content"
    if role != "user" and any(not isinstance(part, TextPart) for part in m.content):
        raise bad_request(f"only user messages may carry images or audio (message {index} is {m.role})",
                          param=where)
    n_images = sum(isinstance(part, ImagePart) for part in m.content)
    if n_images > limits.max_images_per_turn:  # refused before decoding any of them
        raise bad_request(f"{n_images} images in one turn (message {index}); the limit is "
                          f"{limits.max_images_per_turn}: send fewer images per message", param=where,
                          code="too_many_images")
    texts, images, audios = [], [], []
    for j, part in enumerate(m.content):
        try:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image_url(url, allow_remote_images, limits))
            else:
                audios.append(load_input_audio(part.input_audio.data, part.input_audio.format, limits))
        except MediaError as e:
            param = f"{where}[{j}]"
            if e.too_large:
                raise APIError(413, str(e), param=param, code="media_too_large") from None
            raise bad_request(str(e), param=param, code=e.code or "invalid_media") from None
    return Message(role, "\n".join(texts), images, audios)


def to_messages(messages: list[ChatMessage], limits: Limits, allow_remote_images: bool = False) -> list[Message]:
    """The engine's messages for wire messages (media decoded); raises APIError for what the client must fix."""
    return [to_message(i, m, allow_remote_images, limits) for i, m in enumerate(messages)]


def check_tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest) -> None:
    """Refuse the /tokenize fields whose answer would not be the engine's prompt (or that are not served)."""
    if req.return_token_strs:
        raise unsupported("return_token_strs", "return_token_strs is not supported: the token ids alone are "
                                               "returned (POST /detokenize turns ids back into text)")
    if isinstance(req, TokenizeCompletionRequest):
        return
    if not req.add_generation_prompt:
        raise unsupported("add_generation_prompt", "add_generation_prompt false is not supported: the prompt is "
                                                   "counted as the engine prefills it, with the generation prompt")
    if req.continue_final_message:
        raise unsupported("continue_final_message", "continue_final_message is not supported: the engine always "
                                                    "answers a last user message")
    if req.add_special_tokens:
        raise unsupported("add_special_tokens", "add_special_tokens true is not supported for messages: the "
                                                "rendered chat prompt already holds the special tokens the "
                                                "engine prefills; leave it out")
    if req.chat_template is not None:
        raise unsupported("chat_template", "chat_template is not supported: the model's own template is used")
    if req.tools:
        raise unsupported("tools", "tools are not supported: this model cannot call tools; leave tools out")


def session_id(user: str | None) -> str:
    """The client's ``user`` as a session id (it is logged: printable characters only, so no newlines
    can forge log lines; 128 at most), or a fresh one per request."""
    user = "".join(ch for ch in clean_text(user) if ch.isprintable()).strip()[:128] if user else ""
    return user or f"api-{uuid.uuid4().hex[:12]}"


def to_chat_request(req: ChatCompletionRequest, limits: Limits, allow_remote_images: bool = False) -> ChatRequest:
    """The engine request for a wire request; raises APIError for what the client must fix."""
    if not req.messages:  # the engine says the same; here the error can name the field
        raise bad_request("messages is empty: send at least one user message", param="messages")
    refuse_unsupported(req)
    options = to_options(req)
    messages = to_messages(req.messages, limits, allow_remote_images)
    return ChatRequest(messages=messages, options=options, session_id=session_id(req.user))


# ----------------------------------------------------------------------------- engine -> wire


@dataclass
class Extras:
    """Which non-OpenAI fields the client asked for."""

    reasoning: bool = True
    focus: bool = False
    routing: bool = False
    stats: bool = False
    routed_experts: bool = False
    logprobs: bool = False

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> Extras:
        return cls(reasoning=req.return_reasoning is not False, focus=req.return_focus,
                   routing=req.return_routing, stats=req.return_stats or req.return_routing,
                   routed_experts=req.return_routed_experts, logprobs=bool(req.logprobs))

    def wants_logprob(self, event: Logprobs) -> bool:
        """A token's logprob goes out with the text it belongs to: a reasoning token's only when the reasoning does."""
        return self.logprobs and (event.phase == "answer" or self.reasoning)


@dataclass
class RoutedExperts:
    """Collects a request's Routing events into vLLM's ``routed_experts``: base64 of an ``.npy`` file holding
    the int16 ``[tokens, moe_layers, top_k]`` array of ``events.routed_experts_array`` (prompt tokens from the
    probe's prefill record, then the generated tokens but the last). None when no Routing came (a dense
    model, the remote backend)."""

    routes: list = field(default_factory=list)
    prompt: np.ndarray | None = None
    layers: list[int] | None = None
    top_k: int = 0

    def add(self, event: Routing) -> None:
        self.routes.append(event.layers)
        if self.layers is None:
            c = event.counts
            self.layers, self.top_k = (c["layers"], c["top_k"]) if isinstance(c, dict) else (c.layers, c.top_k)
        if event.prompt_experts is not None:
            self.prompt = event.prompt_experts

    def array(self) -> np.ndarray | None:
        if self.layers is None:
            return None
        return routed_experts_array(self.prompt, self.routes, self.layers, self.top_k)

    def encoded(self) -> str | None:
        arr = self.array()
        if arr is None:
            return None
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return base64.b64encode(buf.getvalue()).decode("ascii")


ENGINE_ERROR_STATUS = {"bad_request": (400, "invalid_request_error"), "busy": (503, "server_busy"),
                       "cancelled": (499, "cancelled"), "internal": (500, "server_error"),
                       "out_of_memory": (503, "server_error")}
RETRY_AFTER = {"busy": "5", "out_of_memory": "1"}  # seconds, for the errors worth retrying


def engine_error(event: Error) -> APIError:
    status, type_ = ENGINE_ERROR_STATUS.get(event.kind, (500, "server_error"))
    headers = {"Retry-After": RETRY_AFTER[event.kind]} if event.kind in RETRY_AFTER else None
    return APIError(status, event.message, type=type_, code=event.kind, headers=headers)


def image_focus(event: Focus) -> list[ImageFocus]:
    return [ImageFocus(token=event.token, index=event.index, image_index=i,
                       grid=np.round(np.asarray(grid, dtype=np.float64), 6).tolist())
            for i, grid in enumerate(event.images)]


def token_routing(event: Routing) -> TokenRouting:
    return TokenRouting(token=event.token, index=event.index,
                        layers=[LayerRouting(layer=r.layer, experts=list(r.experts),
                                             weights=[round(float(w), 5) for w in r.weights])
                                for r in event.layers])


def completion_stats(s: Stats, expert_load: dict | None) -> CompletionStats:
    return CompletionStats(
        ttft_ms=round(s.ttft_s * 1000, 3), think_ms=None if s.think_s is None else round(s.think_s * 1000, 3),
        queue_ms=round(s.queue_s * 1000, 3), total_ms=round(s.total_s * 1000, 3),
        tokens_per_second=round(s.tokens_per_second, 3), prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens, reasoning_tokens=s.reasoning_tokens, answer_tokens=s.answer_tokens,
        peak_memory_bytes=dict(s.peak_memory), attention=s.attention, expert_load=expert_load,
        routing=s.routing if expert_load is not None else None,
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


def sse(payload: BaseModel) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


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
    last_routing: Routing | None = None
    finish: str = "stop"
    routed: RoutedExperts = field(default_factory=RoutedExperts)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, event: Event) -> None:
        """Take one event; an engine Error raises APIError."""
        if isinstance(event, Logprobs):
            if self.extras.wants_logprob(event):
                self.logprobs.append(wire_logprob(event))
        elif isinstance(event, Answer):
            self.answer.append(event.text)
        elif isinstance(event, Reasoning):
            self.reasoning.append(event.text)
        elif isinstance(event, Focus) and self.extras.focus and event.images:
            self.focus.append(image_focus(event))
        elif isinstance(event, Routing) and (self.extras.routing or self.extras.routed_experts):
            if self.extras.routed_experts:
                self.routed.add(event)
            if self.extras.routing:
                self.routing.append(token_routing(event))
                self.last_routing = event  # its load is built once, at the end (not per token)
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
        load = self.last_routing.load if self.last_routing else None
        stats = completion_stats(self.stats, load) if self.extras.stats and self.stats else None
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=[Choice(message=message, finish_reason=self.finish,
                                              logprobs=ChoiceLogprobs(content=self.logprobs)
                                              if self.extras.logprobs else None,
                                              routed_experts=self.routed.encoded() if self.extras.routed_experts
                                              else None)],
                              usage=usage(self.stats), stats=stats)


@dataclass
class ChunkBuilder:
    """Turns one request's events into ``chat.completion.chunk`` objects, in order.

    Text deltas go out as they come. With focus, routing or logprobs asked for, a token's chunk
    is held until its next event: the Logprobs / Focus / Routing records of the same token
    (which the engine emits right after the token's text) ride on that chunk (logprobs on its
    choice, the rest on its delta); a token with no text of its own (half a character, a think
    tag) gets a chunk with those only.
    """

    model: str
    extras: Extras
    include_usage: bool = False
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    pending: Delta | None = None
    pending_index: int | None = None  # the token whose telemetry the pending delta carries
    stats: Stats | None = None
    last_routing: Routing | None = None
    routed: RoutedExperts = field(default_factory=RoutedExperts)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def holds_for_telemetry(self) -> bool:
        return self.extras.focus or self.extras.routing or self.extras.logprobs

    def chunk(self, delta: Delta, finish: str | None = None, routed_experts: str | None = None,
              logprobs: list[TokenLogprob] | None = None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish,
                                                        logprobs=ChoiceLogprobs(content=logprobs)
                                                        if logprobs else None,
                                                        routed_experts=routed_experts)], **extra)

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
        elif isinstance(event, Logprobs):
            if self.extras.wants_logprob(event):
                if self.pending is not None and self.pending_index not in (None, event.index):
                    out += self.flush()
                if self.pending is None:
                    self.pending = Delta()
                self.pending_logprobs.append(wire_logprob(event))
                self.pending_index = event.index
        elif isinstance(event, Focus) and self.extras.focus and event.images:
            out += self.attach(event.index, "focus", image_focus(event))
        elif isinstance(event, Routing) and (self.extras.routing or self.extras.routed_experts):
            if self.extras.routed_experts:
                self.routed.add(event)
            if self.extras.routing:
                self.last_routing = event  # its load is built once, at the end (not per token)
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
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        return [self.chunk(delta, logprobs=logprobs)] if delta is not None else []

    def finish(self, reason: str) -> list[ChatCompletionChunk]:
        load = self.last_routing.load if self.last_routing else None
        stats = completion_stats(self.stats, load) if self.extras.stats and self.stats else None
        routed = self.routed.encoded() if self.extras.routed_experts else None
        out = [self.chunk(Delta(), finish=reason, stats=stats, routed_experts=routed)]
        if self.include_usage:
            out.append(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                           usage=usage(self.stats)))
        return out
