"""Builders: one request's engine events -> the wire (the way in is ``api/serving.py``).

``CompletionBuilder`` (non-streaming) and ``ChunkBuilder`` (streaming) turn one request's event stream
into a ``chat.completion`` or a sequence of ``chat.completion.chunk`` objects; ``Extras`` says which
non-OpenAI fields (and logprobs) the client asked for; the small converters turn one event into its
wire model.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from ..events import Answer, Done, Error, Event, Focus, Logprobs, Reasoning, Routing, Stats, routed_experts_array
from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    CompletionStats,
    ResponseMessage,
    TokenDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)


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
        c = event.counts
        if self.layers is None and c is not None:  # (the first token's event always has counts)
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


def wire_logprob(event: Logprobs) -> TokenLogprob:
    return TokenLogprob(token=event.token, logprob=event.logprob, bytes=list(event.bytes),
                        top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.bytes))
                                      for a in event.top])


def engine_error(event: Error) -> APIError:
    status, type_ = ENGINE_ERROR_STATUS.get(event.kind, (500, "server_error"))
    headers = {"Retry-After": RETRY_AFTER[event.kind]} if event.kind in RETRY_AFTER else None
    return APIError(status, event.message, type=type_, code=event.kind, headers=headers)


# The telemetry of a token is built as plain dicts (ints and floats from tolist), and a chunk is validated from one
# dict (``ChunkBuilder.chunk``): pydantic's Rust validator then builds the nested models, where constructing them one
# by one (nine model __init__ calls a token) was most of the API's work per telemetry token on the event loop.


def image_focus(event: Focus) -> list[dict]:
    """A token's ``ImageFocus`` entries (as dicts), one per image."""
    return [{"token": event.token, "index": event.index, "image_index": i,
             "grid": np.round(np.asarray(grid, dtype=np.float64), 6).tolist()}
            for i, grid in enumerate(event.images)]


def token_routing(event: Routing) -> dict:
    """A token's ``TokenRouting`` (as a dict)."""
    ids, experts, weights = event.arrays()
    weights = np.round(np.asarray(weights, dtype=np.float64), 5).tolist()  # one rounding for all the layers
    return {"token": event.token, "index": event.index,
            "layers": [{"layer": layer, "experts": e, "weights": w}
                       for layer, e, w in zip(ids, np.asarray(experts).tolist(), weights)]}


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
    focus: list[list[dict]] = field(default_factory=list)  # ImageFocus / TokenRouting dicts, validated at the end
    routing: list[dict] = field(default_factory=list)
    stats: Stats | None = None
    last_routing: Routing | None = None
    finish: str = "stop"
    routed: RoutedExperts = field(default_factory=RoutedExperts)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, event: Event) -> None:
        """Take one event; an engine Error raises APIError."""
        if isinstance(event, Logprobs) and self.extras.wants_logprob(event):
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
    pending: dict | None = None  # the next chunk's Delta fields
    pending_index: int | None = None  # the token whose telemetry the pending delta carries
    stats: Stats | None = None
    last_routing: Routing | None = None
    routed: RoutedExperts = field(default_factory=RoutedExperts)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def holds_for_telemetry(self) -> bool:
        return self.extras.focus or self.extras.routing or self.extras.logprobs

    def chunk(self, delta: dict, finish: str | None = None, routed_experts: str | None = None,
              logprobs: list[TokenLogprob] | None = None, **extra) -> ChatCompletionChunk:
        """One chunk, validated from one dict (see ``image_focus``)."""
        return ChatCompletionChunk.model_validate({
            "id": self.id, "created": self.created, "model": self.model, **extra,
            "choices": [{"delta": delta, "finish_reason": finish, "routed_experts": routed_experts,
                         "logprobs": ChoiceLogprobs(content=logprobs) if logprobs else None}]})

    def first(self) -> ChatCompletionChunk:
        return self.chunk({"role": "assistant", "content": ""})

    def add(self, event: Event) -> list[ChatCompletionChunk]:
        """Take one event; return the chunks now ready. An engine Error raises APIError."""
        out: list[ChatCompletionChunk] = []
        if isinstance(event, (Answer, Reasoning)):
            out += self.flush()
            if isinstance(event, Reasoning) and not self.extras.reasoning:
                return out
            text = event.text
            self.pending = ({"content": text} if isinstance(event, Answer)
                            else {"reasoning_content": text, "reasoning": text})
            if not self.holds_for_telemetry:
                out += self.flush()
        elif isinstance(event, Logprobs) and self.extras.wants_logprob(event):
            out += self.attach(event.index, "logprobs", wire_logprob(event))
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
        """Put one of a token's records on the pending chunk (a new chunk for another token's, or for a second
        record of the same kind); ``logprobs`` go on the chunk's choice, the rest on its delta."""
        out = []
        if self.pending is not None and (self.pending_index not in (None, index) or name != "logprobs"
                                         and name in self.pending):
            out = self.flush()
        if self.pending is None:
            self.pending = {}
        if name == "logprobs":
            self.pending_logprobs.append(value)
        else:
            self.pending[name] = value
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
        out = [self.chunk({}, finish=reason, stats=stats, routed_experts=routed)]
        if self.include_usage:
            out.append(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                           usage=usage(self.stats)))
        return out
