"""The OpenAI wire format as pydantic models: requests, responses, streamed chunks, error objects.

Models only: no I/O, no engine types. ``api/serving.py`` turns a ``ChatCompletionRequest`` into
the engine's request, ``api/builders.py`` the engine's events into these responses; ``api/routes.py``
serves them.

Extensions to the OpenAI format (all opt-in, absent unless asked for):
  * ``reasoning_content`` (and the same text in ``reasoning``) on messages and deltas,
    on by default, off with ``return_reasoning: false``;
  * ``focus`` / ``routing`` per generated token with ``return_focus`` / ``return_routing``;
  * ``stats`` (timings, throughput) with ``return_stats`` or ``return_routing``;
  * ``routed_experts`` on the choice with ``return_routed_experts`` (MoE models): vLLM's and SGLang's
    field, a base64 string of a NumPy ``.npy`` file (``np.load(io.BytesIO(base64.b64decode(s)))``) holding
    an int16 array ``[tokens, moe_layers, top_k]``: every prompt token, then every generated token but the
    last (never forwarded), as vLLM returns them; -1 where a layer did not route a token. Streamed, it
    comes on the chunk with the finish reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


# ----------------------------------------------------------------------------- requests


def thinking_switch(enable_thinking: bool | None, chat_template_kwargs: dict[str, Any] | None) -> bool:
    """Thinking on or off: the top-level switch first, then chat_template_kwargs; on when neither says."""
    if enable_thinking is not None:
        return enable_thinking
    return bool((chat_template_kwargs or {}).get("enable_thinking", True))


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


class ResponseFormat(_Lenient):
    type: str  # only "text" is served; "json_object" / "json_schema" are refused


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    # an example for the schema's readers (and the fuzzer's example phase): a short greedy text turn
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "Who are you?"}],
         "temperature": 0, "max_tokens": 8}]})

    model: str | None = None  # None: the first served name
    messages: list[ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: int | None = None  # vLLM's: end-of-text is held back until this many tokens
    logprobs: bool | None = None  # each generated token's log-probability in choices[].logprobs
    top_logprobs: int | None = None  # and this many most likely alternatives at each position (0..20)
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
    return_routed_experts: bool = False  # vLLM's extension: choices[0].routed_experts
    # OpenAI fields this server does not implement: typed so that ``serving.refuse_unsupported`` can
    # refuse them by name (a 400) instead of ignoring them, see the README's field table
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    @property
    def thinking(self) -> bool:
        return thinking_switch(self.enable_thinking, self.chat_template_kwargs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TokenizeCompletionRequest(_Lenient):
    """vLLM's /tokenize for a text prompt: the tokenizer alone."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False  # refused: ids only


class TokenizeChatRequest(_Lenient):
    """vLLM's /tokenize for chat messages: the prompt the engine would prefill for them."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True  # the engine always renders it: false is refused
    continue_final_message: bool = False  # refused
    add_special_tokens: bool = False  # the rendered prompt is the engine's: true is refused
    return_token_strs: bool = False  # refused: ids only
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused: the model's own template is used
    tools: list[dict[str, Any]] | None = None  # refused, as on /v1/chat/completions

    @property
    def thinking(self) -> bool:
        return thinking_switch(self.enable_thinking, self.chat_template_kwargs)


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------- responses


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the server's context limit (--context-limit)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str



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
    routing: dict | None = None  # the turn's routing summary (events.routing_summary), with return_routing


class TokenDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: TokenDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's per-choice logprobs: one entry per generated token, in order (with reasoning returned, the
    reasoning's tokens too, as vLLM does; ``refusal`` is never filled: this server does not refuse)."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None
    reasoning: str | None = None
    focus: list[list[ImageFocus]] | None = None  # one list per token, one entry per image
    routing: list[TokenRouting] | None = None  # one entry per token


ROUTED_EXPERTS_DOC = ("base64 of a .npy file: int16 [tokens, moe_layers, top_k], the prompt's tokens then the "
                      "generated ones but the last (vLLM's layout); with return_routed_experts")


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None
    routed_experts: str | None = Field(None, description=ROUTED_EXPERTS_DOC)


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
    logprobs: ChoiceLogprobs | None = None  # of the tokens whose text (or telemetry) this chunk carries
    routed_experts: str | None = Field(None, description=ROUTED_EXPERTS_DOC + " (on the finish chunk)")


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
