"""Reading and judging the server's answers: outcomes, refusals, SSE streams, completions, UI histories."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .options import BAD_KINDS

@dataclass
class Outcome:
    kind: str
    outcome: str
    status: int | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    detail: str = ""
    retry_after: float | None = None
    client: int = -1
    t: float = 0.0  # seconds since the start of the run


class Malformed(Exception):
    """The server's answer is not what the protocol promises."""


def error_object_ok(payload) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err.get("message")) \
        and isinstance(err.get("type"), str)


def retry_after_of(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify_refusal(kind: str, response, body: bytes) -> Outcome | None:
    """A non-200 answer: busy, the expected 4xx, or a server error. None for 200."""
    status = response.status_code
    if status == 200:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if status in (429, 503):
        ra = retry_after_of(response)
        if ra is None or not error_object_ok(payload):
            return Outcome(kind, "server_error", status, detail="busy answer without Retry-After or error object")
        return Outcome(kind, "busy", status, retry_after=ra)
    if 400 <= status < 500:
        if not error_object_ok(payload):
            return Outcome(kind, "server_error", status,
                           detail=f"{status} without an OpenAI error object: {body[:200]!r}")
        if kind in BAD_KINDS:
            return Outcome(kind, "bad_request_rejected", status, detail=payload["error"].get("code") or "")
        return Outcome(kind, "server_error", status,
                       detail=f"good request refused: {payload['error']['message'][:200]}")
    return Outcome(kind, "server_error", status, detail=f"HTTP {status}: {body[:200]!r}")


@dataclass
class StreamRead:
    role: bool = False
    reasoning: str = ""
    content: str = ""
    finish: str | None = None
    done: bool = False
    errors: list = field(default_factory=list)
    ttft_s: float | None = None
    chunks: int = 0

    def signature(self) -> tuple:
        return (self.reasoning, self.content, self.finish)


def read_sse(response, t0: float, stop: str | None = None) -> StreamRead:
    """Parse an SSE chat stream; ``stop`` = 'first_chunk' / 'first_token' returns early."""
    r = StreamRead()
    for line in response.iter_lines():
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data: "):
            raise Malformed(f"not an SSE data line: {line[:120]!r}")
        data = line[6:]
        if data == "[DONE]":
            r.done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            raise Malformed(f"SSE data is not JSON: {data[:120]!r}") from None
        r.chunks += 1
        if "error" in obj:
            r.errors.append(obj["error"])
            continue
        if obj.get("object") != "chat.completion.chunk":
            raise Malformed(f"not a chat.completion.chunk: {data[:120]!r}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("role") == "assistant":
                r.role = True
            text, thought = delta.get("content"), delta.get("reasoning_content")
            if (text or thought) and r.ttft_s is None:
                r.ttft_s = time.perf_counter() - t0
            r.content += text or ""
            r.reasoning += thought or ""
            if choice.get("finish_reason"):
                r.finish = choice["finish_reason"]
        if stop == "first_chunk" or (stop == "first_token" and r.ttft_s is not None):
            break
    return r


def ui_signature(history) -> list:
    """The assistant side of a UI /chat answer: [(title or '', content)], durations left out."""
    out = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif isinstance(content, dict):
            content = content.get("text", json.dumps(content, sort_keys=True))
        meta = m.get("metadata") or {}
        out.append([meta.get("title") or "", str(content or ""), meta.get("status") or ""])
    return out


def ui_problem(sig: list) -> str | None:
    """What is wrong with a finished UI answer (None: complete and well formed)."""
    if not sig:
        return "no assistant message"
    for title, content, status in sig:
        if content.startswith("**Error:**"):
            return content
        if title and status == "pending":
            return f"{title!r} still pending at the end"
    last_title, last_content, _ = sig[-1]
    if last_title or not last_content.strip():
        return "the last message is not an answer"
    return None


def completion_signature(resp) -> tuple:
    try:
        obj = resp.json()
        choice = obj["choices"][0]
        msg = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Malformed(f"not a chat.completion: {resp.text[:200]!r}") from None
    if obj.get("object") != "chat.completion" or msg.get("role") != "assistant" \
            or choice.get("finish_reason") not in ("stop", "length") or not isinstance(msg.get("content"), str):
        raise Malformed(f"not a complete chat.completion: {resp.text[:200]!r}")
    return (msg.get("reasoning_content") or "", msg["content"], choice["finish_reason"])
