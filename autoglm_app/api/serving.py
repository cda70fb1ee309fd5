"""Serving: the wire request -> the engine's ``ChatRequest`` (the way back, events -> the wire, is
``api/builders.py``).

``to_chat_request`` converts a ``ChatCompletionRequest`` (decoding its media with ``media``).

Checks live in one place each. Here, at the edge, only what the engine's request cannot express
or what must be refused before any image or recording is decoded: the OpenAI fields this server
does not implement (``refuse_unsupported``: tools, response_format, logit_bias, audio output),
``top_logprobs`` without ``logprobs`` or over 20, ``n``, media on a message that is not the user's,
images per turn (before decoding any), and through ``media`` the bytes, pixels and seconds read from base64 lengths and headers.
Everything else (ranges of the options, roles, text, the decoded media themselves, the context) is
the engine's ``validate_request``.
"""

from __future__ import annotations

import json
import uuid

from ..config import Limits
from ..engine.inputs import clean_text
from ..events import MAX_TOP_LOGPROBS, ChatRequest, Message, Options
from .media import MediaError, load_image_url, load_input_audio
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    TextPart,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
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
