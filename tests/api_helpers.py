"""Helpers for the /v1 API tests: media makers, request builders, a scripted stand-in engine."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import fields

import httpx
import numpy as np
import soundfile as sf
from PIL import Image

from autoglm_app.config import Limits, Settings
from autoglm_app.engine.handle import RequestHandle
from autoglm_app.events import Answer, Done, Queued, Reasoning, Stats
from autoglm_app.server import create_app, serve_in_thread

LIMIT_NAMES = {f.name for f in fields(Limits)}

# a prompt the small random model (seed 0) answers at length when decoding greedily
LONG_PROMPT = "The quick brown fox"


# ----------------------------------------------------------------------------- helpers


def png_bytes(width: int = 32, height: int = 24, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a 1x1 image's): cheap to send."""
    raw = bytearray(png_bytes(1, 1))
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(raw)


def audio_b64(fmt: str = "WAV", seconds: float = 0.5, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def body(**kw) -> dict:
    out = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "hi"}],
           "max_tokens": 4, "temperature": 0}
    out.update(kw)
    return out


def post(url: str, payload=None, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=30, **kw)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, JSON-decoded ('[DONE]' kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


GREEDY_ANSWERS: dict[str, str] = {}  # the standard request's greedy answer, as first served


def assert_serves(url: str) -> None:
    """The server answers the standard request, and gives the same greedy answer (the small model,
    seed 0) that the first server asked gave: a broken or half-cancelled engine would not."""
    r = post(url, body())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["completion_tokens"] >= 1 and data["choices"][0]["finish_reason"] in ("stop", "length")
    answer = data["choices"][0]["message"]["content"]
    assert answer == GREEDY_ANSWERS.setdefault("standard", answer)


def serve(engine, **settings):
    """The API alone on loopback; keyword arguments are Settings or Limits fields (max_body_mb=1)."""
    limits = Limits(**{name: settings.pop(name) for name in LIMIT_NAMES & set(settings)})
    return serve_in_thread(create_app(engine, Settings(model="small", limits=limits, **settings), ui=False))


class ScriptedEngine:
    """Engine stand-in for wire-format tests: every request gets the same scripted events."""

    ready = True
    max_queue = 4

    def __init__(self, events: list):
        self.script = events
        self.requests = []

    def info(self) -> dict:
        return {"model_id": "scripted"}

    def submit(self, request) -> RequestHandle:
        self.requests.append(request)
        handle = RequestHandle(request, len(self.requests))
        for event in self.script:
            handle.put(event)
        return handle


def stats(**kw) -> Stats:
    base = dict(ttft_s=0.01, think_s=0.02, reasoning_tokens=3, answer_tokens=2, reasoning_tps=100.0,
                answer_tps=100.0, tokens_per_second=100.0, prompt_tokens=7, completion_tokens=5, queue_s=0.0,
                total_s=0.05, peak_memory={"cpu": 1}, finish_reason="stop", attention="sdpa+probe")
    return Stats(**{**base, **kw})


THINKING_SCRIPT = [Queued(0), Reasoning("Let me "), Reasoning("look."), Answer("A red "), Answer("square."),
                   stats(), Done("stop")]
