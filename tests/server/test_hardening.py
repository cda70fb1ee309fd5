"""Hardening (issue #8): bad input, overload, disconnects, out of memory, security.

Every bad input goes through the API (an OpenAI error object with a 4xx status) and, for media and
text, through the page's handlers (a readable warning, nothing sent) or its gradio_client endpoint;
each is followed by a good request whose greedy answer equals the answer the server gave before
(the server is alive and answers correctly). Out of memory is injected on the CPU by making the
model's forward raise ``torch.OutOfMemoryError``. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import threading
import time
import warnings
from http.server import HTTPServer, SimpleHTTPRequestHandler
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from autoglm_app.api import media, routes
from autoglm_app.config import Limits, Settings, parse_settings
from autoglm_app.engine import worker as core
from autoglm_app.events import (
    Answer,
    Audio,
    BadRequest,
    ChatRequest,
    Done,
    Error,
    Message,
    Options,
    Reasoning,
    Stats,
)
from autoglm_app.engine.inputs import clean_text, open_image, to_mono_16k
from autoglm_app.server import create_app, serve_in_thread, startup_warnings
from autoglm_app.ui.handlers import Handlers as Studio
from autoglm_app.ui.layout import build_page
from autoglm_app.ui.session import Session
from tests.helpers import make_engine
from tests.ui_helpers import page_send
from tests.api_helpers import (
    LONG_PROMPT,
    assert_error,
    body,
    data_url,
    huge_png_header,
    image,
    png_bytes,
    post,
    sse_events,
    text,
    user,
)

WAIT_S = 20  # every wait below is bounded by this


# ----------------------------------------------------------------------------- media makers


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_png(width: int = 32, height: int = 24) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))


def corrupt_png() -> bytes:
    raw = bytearray(noise_png())
    start = raw.index(b"IDAT") + 4
    for k in range(start + 10, start + 60):  # scramble the compressed pixel data
        raw[k] ^= 0xA5
    return bytes(raw)


def truncated_png() -> bytes:
    raw = noise_png()
    return raw[: len(raw) // 2]


NOT_AN_IMAGE = b"name,colour\ncircle,red\n"  # a text file, sent as (or named) .png


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 24), c) for c in ("red", "lime", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def grey16_png() -> bytes:
    return encode(Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)))


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG")


def rgba_png() -> bytes:
    return encode(Image.new("RGBA", (32, 24), (255, 0, 0, 128)))


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (32, 24), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (8, 8, 24, 16))
    return encode(img, transparency=0)


BOMB = huge_png_header(30_000, 30_000)  # claims 900 M pixels; a few dozen bytes


def wav_bytes(seconds: float, rate: int = 16000, channels: int = 1, silent: bool = False) -> bytes:
    """16-bit PCM WAV: a 440 Hz tone (or silence)."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = np.zeros(n) if silent else 0.3 * np.sin(2 * np.pi * 440 * t)
    x = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, (x * 32767).astype(np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_part(raw: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


BAD_IMAGES = {  # name -> (bytes, expected status, words in the message)
    "corrupt PNG": (corrupt_png(), 400, "could not be decoded"),
    "truncated PNG": (truncated_png(), 400, "could not be decoded"),
    "text file named .png": (NOT_AN_IMAGE, 400, "could not be decoded"),
    "decompression bomb 30000x30000": (BOMB, 413, "900,000,000 pixels; the limit is 40,000,000"),
}
ODD_IMAGES = {  # accepted and answered
    "animated GIF (first frame)": animated_gif(),
    "16-bit greyscale PNG": grey16_png(),
    "CMYK JPEG": cmyk_jpeg(),
    "RGBA PNG": rgba_png(),
    "palette PNG with transparency": palette_png_with_transparency(),
}
BAD_RECORDINGS = {  # name -> (bytes, status, words)
    "empty recording (no samples)": (wav_bytes(0.0), 400, "empty"),
    "10-minute recording": (wav_bytes(600.0, rate=8000), 400, "limit is 30 s"),
    "zero bytes": (b"", 400, "empty"),
}
GOOD_RECORDINGS = {
    "silent recording": wav_bytes(1.0, silent=True),
    "8 kHz stereo int16": wav_bytes(0.5, rate=8000, channels=2),
    "192 kHz": wav_bytes(0.5, rate=192000),
}


# ----------------------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def url(live_server) -> str:
    return live_server


@pytest.fixture(scope="module")
def reference(url) -> str:
    """The greedy answer to the standard request, before any bad input."""
    r = post(url, body())
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def assert_alive(url: str, reference: str) -> None:
    """The server answers the standard request, and answers it as it did before."""
    r = post(url, body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference


@pytest.fixture(scope="module")
def studio(engine) -> Studio:
    return build_page(engine, Settings(model="small"))[1]


class _Warnings:
    """Collects gr.Warning messages (outside a Gradio request they are Python UserWarnings)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.messages = [str(w.message) for w in self._records if issubclass(w.category, UserWarning)
                         and not issubclass(w.category, DeprecationWarning)]
        return self._cm.__exit__(*exc)


def ui_send(studio: Studio, session: Session, text: str = "", files=(), recording: str | None = None,
            who: str = "ui", max_new_tokens: int = 4) -> tuple[list[dict], list[str]]:
    """Drive the page's Send handler as Gradio would (greedy, thinking off); returns (updates, warnings)."""
    request = SimpleNamespace(session_hash=who)
    with _Warnings() as caught:
        updates = list(page_send(studio, session, text, files, recording, request, max_new_tokens=max_new_tokens))
    return updates, caught.messages


@pytest.fixture(scope="module")
def ui_reference(studio) -> str:
    session = Session()
    ui_send(studio, session, "hi")
    assert session.turns[-1].ok, session.turns[-1].error
    return session.turns[-1].answer


def assert_ui_alive(studio: Studio, ui_reference: str) -> None:
    session = Session()
    _, warned = ui_send(studio, session, "hi")
    turn = session.turns[-1]
    assert turn.ok and not warned, (turn.error, warned)
    assert turn.answer == ui_reference


def write(tmp_path, name: str, raw: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


# ----------------------------------------------------------------------------- images: API


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_through_the_api_is_a_clear_error_and_the_server_keeps_serving(url, reference, name):
    raw, status, words = BAD_IMAGES[name]
    r = post(url, body(messages=[user(text("what is this?"), image(data_url(raw)))]))
    err = assert_error(r, status)
    assert words in err["message"] and err["param"] == "messages[0].content[1]"
    assert_alive(url, reference)


@pytest.mark.parametrize("name", ODD_IMAGES)
def test_odd_image_modes_through_the_api_are_answered(url, reference, name):
    mime = "image/gif" if name.startswith("animated") else "image/jpeg" if "JPEG" in name else "image/png"
    r = post(url, body(messages=[user(text("what is this?"), image(data_url(ODD_IMAGES[name], mime)))]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert_alive(url, reference)


def test_an_animated_gif_gives_its_first_frame():
    img = open_image(animated_gif())
    assert getattr(img, "n_frames", 1) == 1 and img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding_pixels(monkeypatch):
    def no_decoding(self, *a, **kw):
        raise AssertionError("pixels were decoded")

    under_pils_guard = huge_png_header(10_000, 10_000)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(BadRequest, match="900,000,000 pixels; the limit is 40,000,000"):
        open_image(BOMB)
    with pytest.raises(BadRequest, match="10000x10000 pixels; the limit is 40,000,000"):  # under PIL's own guard
        open_image(under_pils_guard)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_in_the_page_is_a_readable_warning_and_nothing_is_sent(studio, ui_reference, tmp_path, name):
    raw, _, words = BAD_IMAGES[name]
    path = write(tmp_path, "upload.png", raw)
    session = Session()
    updates, warned = ui_send(studio, session, "what is this?", [path])
    assert session.turns == [] and len(updates) == 1
    assert len(warned) == 1 and "upload.png" in warned[0]
    assert ("900,000,000 pixels" if "bomb" in name else "Could not read upload.png as an image") in warned[0]
    assert "Traceback" not in warned[0]
    assert_ui_alive(studio, ui_reference)


@pytest.mark.parametrize("name", ODD_IMAGES)
def test_odd_image_modes_in_the_page_are_answered(studio, tmp_path, name):
    suffix = ".gif" if name.startswith("animated") else ".jpg" if "JPEG" in name else ".png"
    session = Session()
    _, warned = ui_send(studio, session, "what is this?", [write(tmp_path, "odd" + suffix, ODD_IMAGES[name])])
    turn = session.turns[-1]
    assert turn.ok and not warned, (turn.error, warned)
    assert turn.tokens and all(t.images for t in turn.tokens.values())  # focus maps over the image


def test_bad_media_through_gradio_client_is_a_readable_error(live_server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(live_server, verbose=False)
    settings = (False, 0.0, 1.0, 4, 1)
    bomb = write(tmp_path, "bomb.png", BOMB)
    with pytest.raises(Exception, match="900,000,000 pixels") as info:
        client.predict("what is this?", [handle_file(bomb)], None, *settings, api_name="/chat")
    assert "Traceback" not in str(info.value)
    fake = write(tmp_path, "notes.png", NOT_AN_IMAGE)
    with pytest.raises(Exception, match="as an image"):
        client.predict("what is this?", [handle_file(fake)], None, *settings, api_name="/chat")
    long = write(tmp_path, "long.wav", BAD_RECORDINGS["10-minute recording"][0])
    with pytest.raises(Exception, match="limit is 30 s"):
        client.predict("", [], handle_file(long), *settings, api_name="/chat")
    history = client.predict("hi", [], None, *settings, api_name="/chat")
    assert history[-1]["role"] == "assistant" and "Error" not in str(history[-1]["content"])


# ----------------------------------------------------------------------------- recordings


@pytest.mark.parametrize("name", BAD_RECORDINGS)
def test_bad_recording_through_the_api_is_a_clear_error(url, reference, name):
    raw, status, words = BAD_RECORDINGS[name]
    err = assert_error(post(url, body(messages=[user(audio_part(raw))])), status)
    assert words in err["message"]
    assert_alive(url, reference)


@pytest.mark.parametrize("name", GOOD_RECORDINGS)
def test_unusual_recordings_through_the_api_are_answered(url, reference, name):
    r = post(url, body(messages=[user(text("what did you hear?"), audio_part(GOOD_RECORDINGS[name]))]))
    assert r.status_code == 200, r.text
    assert_alive(url, reference)


def test_a_long_recording_is_refused_from_its_header_before_decoding(monkeypatch):
    def no_decoding(*a, **kw):
        raise AssertionError("the samples were decoded")

    monkeypatch.setattr(media.sf, "read", no_decoding)
    raw = base64.b64encode(BAD_RECORDINGS["10-minute recording"][0]).decode()
    with pytest.raises(media.MediaError, match="600.0 s long; the limit is 30 s") as info:
        media.load_input_audio(raw, "wav", Limits())
    assert info.value.code == "audio_too_long"
    # the engine's own check also looks at the length before converting any sample
    samples = np.zeros((600 * 8000, 2), np.int16)
    with pytest.raises(BadRequest, match="limit is 30 s"):
        to_mono_16k(Audio(samples, 8000), 30.0)


@pytest.mark.parametrize("name", [*BAD_RECORDINGS][:2])
def test_bad_recording_in_the_page_is_a_readable_warning(studio, ui_reference, tmp_path, name):
    raw, _, words = BAD_RECORDINGS[name]
    session = Session()
    _, warned = ui_send(studio, session, "", recording=write(tmp_path, "q.wav", raw))
    assert len(warned) == 1 and words in warned[0].lower() and "Traceback" not in warned[0]
    assert not session.turns or not session.turns[-1].ok
    assert_ui_alive(studio, ui_reference)


@pytest.mark.parametrize("name", GOOD_RECORDINGS)
def test_unusual_recordings_in_the_page_are_answered(studio, tmp_path, name):
    session = Session()
    _, warned = ui_send(studio, session, "", recording=write(tmp_path, "q.wav", GOOD_RECORDINGS[name]))
    assert session.turns[-1].ok and not warned, (session.turns[-1].error, warned)


# ----------------------------------------------------------------------------- the request itself


def post_raw(url: str, content: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=30,
                      headers={"content-type": "application/json"})


MALFORMED = {
    "cut off": b'{"messages": [',
    "empty body": b"",
    "trailing garbage": b'{"messages": []} }',
    "NaN is not JSON": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}], "max_tokens": 4}',
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_json_and_invalid_utf8_get_400_invalid_json(url, reference, name):
    err = assert_error(post_raw(url, MALFORMED[name]), 400, "invalid_json")
    if name == "invalid UTF-8":
        assert "UTF-8" in err["message"]
    assert_alive(url, reference)


WRONG_TYPES = {
    "messages as a string": body(messages="hi"),
    "a message as a number": body(messages=[1]),
    "content as a number": body(messages=[{"role": "user", "content": 5}]),
    "role as a number": body(messages=[{"role": 7, "content": "hi"}]),
    "temperature 'hot'": body(temperature="hot"),
    "max_tokens 'many'": body(max_tokens="many"),
    "stream 'maybe'": body(stream="maybe"),
    "image_url.url as a number": body(messages=[user({"type": "image_url", "image_url": {"url": 5}})]),
    "input_audio.data as a list": body(messages=[user({"type": "input_audio", "input_audio": {"data": [1]}})]),
    "the body is a list": [body()],
    "the body is null": None,
}


@pytest.mark.parametrize("name", WRONG_TYPES)
def test_wrong_field_types_get_400_naming_the_field(url, reference, name):
    payload = WRONG_TYPES[name]
    r = post_raw(url, json.dumps(payload).encode())
    err = assert_error(r, 400)
    assert err["type"] == "invalid_request_error" and err["message"].startswith("invalid request")
    field = name.split(" ")[0].split(".")[0].strip("'")
    if field in ("messages", "temperature", "max_tokens", "stream"):
        assert field in err["message"]
    assert_alive(url, reference)


def test_unknown_content_part_types_get_400(url, reference):
    for part in ({"type": "video_url", "video_url": {"url": "x"}}, {"type": "file", "file": {}}, {"text": "no type"}):
        err = assert_error(post(url, body(messages=[user(part)])), 400)
        assert "messages.0.content" in err["message"]
    assert_alive(url, reference)


def test_control_characters_and_lone_surrogates_are_dropped_and_answered(url, reference, submitted):
    nasty = "hi\x00 there\x1b[31m\x07\x7f\u0085 \ud800ok\tnow\r\n"
    payload = body(messages=[{"role": "system", "content": "be\x00 brief"}, user(text(nasty))],
                   user="sess\nion\x00")
    r = post_raw(url, json.dumps(payload).encode())  # json escapes the lone surrogate as \ud800
    assert r.status_code == 200, r.text
    sent = submitted[-1].request
    assert sent.messages[-1].text == "hi there[31m ok\tnow\r\n" and sent.messages[0].text == "be brief"
    assert sent.session_id == "session"
    assert clean_text("a\x00b\u2028c") == "ab\u2028c"  # printable Unicode (line separator) stays
    assert_alive(url, reference)


def test_control_characters_in_the_page_are_dropped(studio, ui_reference, submitted):
    session = Session()
    _, warned = ui_send(studio, session, "hi\x00\x1b there")
    assert session.turns[-1].ok and not warned
    assert session.turns[-1].text == "hi there" and submitted[-1].request.messages[-1].text == "hi there"


OUT_OF_RANGE = {
    "temperature -0.5": ({"temperature": -0.5}, "temperature"),
    "temperature 6": ({"temperature": 6}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "top_p 1.5": ({"top_p": 1.5}, "top_p"),
    "top_k -1": ({"top_k": -1}, "top_k"),
    "top_k 2.5": ({"top_k": 2.5}, "top_k"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens -3": ({"max_tokens": -3}, "max_tokens"),
    "max_tokens 10**9": ({"max_tokens": 10**9}, "max_tokens"),
    "max_completion_tokens 0": ({"max_completion_tokens": 0}, "max_tokens"),
    "n 2": ({"n": 2}, "n"),
    "n 0": ({"n": 0}, "n"),
    "repetition_penalty 0": ({"repetition_penalty": 0}, "repetition_penalty"),
    "repetition_penalty 11": ({"repetition_penalty": 11}, "repetition_penalty"),
    "seed 2**70": ({"seed": 2**70}, "seed"),
    "20 stop strings": ({"stop": [f"s{i}" for i in range(20)]}, "stop"),
}


@pytest.mark.parametrize("name", OUT_OF_RANGE)
def test_out_of_range_sampling_values_get_400_naming_the_field(url, reference, name):
    fields, named = OUT_OF_RANGE[name]
    err = assert_error(post(url, body(**fields)), 400)
    assert named in err["message"] or err["param"] == named
    assert_alive(url, reference)


@pytest.mark.parametrize("settings, words", [
    ((9.0, 0.9, 8, 1), "temperature must be between 0 and 5"),
    ((0.7, 0.0, 8, 1), "top_p must be in (0, 1]"),
    ((0.7, 0.9, 0, 1), "max_new_tokens (max_tokens) must be an integer between 1 and 8192"),
    ((0.7, 0.9, 10**9, 1), "between 1 and 8192"),
    (("hot", 0.9, 8, 1), "not a number"),
    ((0.7, 0.9, 8, float("nan")), "not a number"),
])
def test_out_of_range_settings_in_the_page_are_a_readable_warning(studio, ui_reference, settings, words):
    temperature, top_p, max_new_tokens, seed = settings
    session = Session()
    with _Warnings() as caught:
        list(page_send(studio, session, "hi", request=SimpleNamespace(session_hash="ranges"), temperature=temperature,
                       top_p=top_p, max_new_tokens=max_new_tokens, seed=seed))
    assert len(caught.messages) == 1 and words.lower() in caught.messages[0].lower() and not session.busy
    assert_ui_alive(studio, ui_reference)


def test_a_tiny_positive_temperature_is_greedy_not_a_crash(url, reference):
    r = post(url, body(temperature=1e-30))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reference


def test_too_many_images_in_one_turn_get_400_before_decoding(url, reference, monkeypatch):
    decoded = []
    real = media.open_image
    monkeypatch.setattr(media, "open_image", lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    many = [image(data_url(png_bytes(8, 8))) for _ in range(9)]
    err = assert_error(post(url, body(messages=[user(text("count them"), *many)])), 400, "too_many_images")
    assert "9 images in one turn" in err["message"] and "limit is 8" in err["message"] and not decoded
    # eight per turn, over two turns, is fine: the limit is per turn
    two = [image(data_url(png_bytes(8, 8))) for _ in range(2)]
    history = [user(text("a"), *two), {"role": "assistant", "content": "ok"}, user(text("b"), *two)]
    assert post(url, body(messages=history)).status_code == 200
    assert_alive(url, reference)


def test_too_many_images_in_the_page_is_a_readable_warning(studio, ui_reference, tmp_path):
    paths = [write(tmp_path, f"i{k}.png", png_bytes(8, 8)) for k in range(9)]
    session = Session()
    _, warned = ui_send(studio, session, "count them", paths)
    assert session.turns == [] and warned == ["9 images in one turn; the limit is 8: send fewer images."]
    assert_ui_alive(studio, ui_reference)


PROMPT_OVER_CONTEXT = "word " * 9000  # over the 8192-token context on its own


def test_a_prompt_over_the_context_limit_is_a_clear_400_streamed_or_not(url, reference):
    for stream in (False, True):
        r = post(url, body(messages=[user(text(PROMPT_OVER_CONTEXT))], stream=stream))
        err = assert_error(r, 400, "bad_request")
        assert "8192-token context" in err["message"] and "shorten the text" in err["message"]
    assert_alive(url, reference)


def test_a_prompt_over_the_context_limit_in_the_page_is_a_readable_warning(studio, ui_reference):
    session = Session()
    _, warned = ui_send(studio, session, PROMPT_OVER_CONTEXT)
    assert len(warned) == 1 and "8192-token context" in warned[0] and warned[0][0].isupper()
    assert session.turns[-1].error and not session.busy
    assert_ui_alive(studio, ui_reference)


# ----------------------------------------------------------------------------- limits are settings


def test_limits_are_settings_with_flags_and_env_vars(monkeypatch):
    s = parse_settings([])
    lim = s.limits
    assert (lim.max_upload_mb, lim.max_body_mb, lim.max_image_pixels, lim.max_audio_seconds, lim.max_images_per_turn,
            lim.max_queue) == (16.0, 25.0, 40_000_000, 30.0, 8, 16)
    assert s.cors_origins == [] and s.trust_remote_code is False and s.api_key is None
    s = parse_settings(["--max-upload-mb", "2", "--max-body-mb", "3", "--max-image-pixels", "1000",
                        "--max-audio-seconds", "5", "--max-images-per-turn", "2", "--max-queue", "3"])
    lim = s.limits
    assert (lim.max_upload_bytes, lim.max_body_bytes, lim.max_image_pixels, lim.max_audio_seconds,
            lim.max_images_per_turn, lim.max_queue) == (2 * 2**20, 3 * 2**20, 1000, 5.0, 2, 3)
    for name, value in (("MAX_UPLOAD_MB", "4"), ("MAX_BODY_MB", "5"), ("MAX_IMAGE_PIXELS", "77"),
                        ("MAX_AUDIO_SECONDS", "9"), ("MAX_IMAGES_PER_TURN", "3"), ("MAX_QUEUE", "2"),
                        ("CORS_ORIGINS", "http://a.example, http://b.example"), ("TRUST_REMOTE_CODE", "1")):
        monkeypatch.setenv(f"AUTOGLM_{name}", value)
    s = parse_settings([])
    lim = s.limits
    assert (lim.max_upload_mb, lim.max_body_mb, lim.max_image_pixels, lim.max_audio_seconds, lim.max_images_per_turn,
            lim.max_queue) == (4.0, 5.0, 77, 9.0, 3, 2)
    assert s.cors_origins == ["http://a.example", "http://b.example"] and s.trust_remote_code is True
    with pytest.raises(SystemExit):
        parse_settings(["--max-images-per-turn", "0"])


def test_limit_settings_reach_the_api_the_engine_and_the_page(small, tmp_path):
    limits = Limits(max_image_pixels=1000, max_images_per_turn=2, max_audio_seconds=1.0, max_upload_mb=0.25)
    settings = Settings(model="small", limits=limits)
    eng = make_engine(*small, max_image_pixels=1000, max_images_per_turn=2, max_audio_seconds=1.0)
    running = serve_in_thread(create_app(eng, settings, ui=False))
    try:
        small_png = data_url(png_bytes(20, 20))  # 400 pixels
        err = assert_error(post(running.url, body(messages=[user(text("x"), image(data_url(png_bytes(40, 40))))])),
                           413, "media_too_large")
        assert "40x40 pixels; the limit is 1,000" in err["message"]
        assert_error(post(running.url, body(messages=[user(text("x"), *[image(small_png)] * 3)])), 400,
                     "too_many_images")
        err = assert_error(post(running.url, body(messages=[user(audio_part(wav_bytes(2.0)))])), 400)
        assert "limit is 1 s" in err["message"]
        big = data_url(noise_png(400, 400))  # about 470 KiB > 0.25 MiB
        assert_error(post(running.url, body(messages=[user(text("x"), image(big))])), 413, "media_too_large")
        assert post(running.url, body(messages=[user(text("x"), image(small_png))])).status_code == 200
        # the engine itself (what the page and a remote backend go through)
        with pytest.raises(BadRequest, match="limit is 1,000"):
            eng.submit(ChatRequest([Message("user", "x", [Image.new("RGB", (40, 40))])]))
        with pytest.raises(BadRequest, match="3 images in one turn"):
            eng.submit(ChatRequest([Message("user", "x", [Image.new("RGB", (4, 4))] * 3)]))
        # the page
        studio = build_page(eng, settings)[1]
        for files, words in (([write(tmp_path, "big.png", png_bytes(40, 40))], "limit is 1,000"),
                             ([write(tmp_path, f"s{k}.png", png_bytes(4, 4)) for k in range(3)], "limit is 2"),
                             ([write(tmp_path, "heavy.png", noise_png(400, 400))], "limit is 0.25 MiB")):
            session = Session()
            _, warned = ui_send(studio, session, "x", files)
            assert session.turns == [] and len(warned) == 1 and words in warned[0], warned
        session = Session()
        _, warned = ui_send(studio, session, "", recording=write(tmp_path, "q.wav", wav_bytes(2.0)))
        assert session.turns == [] and "limit is 1 s" in warned[0]
    finally:
        running.stop()
        eng.close()


# ----------------------------------------------------------------------------- overload


def test_a_full_queue_is_a_busy_warning_in_the_page_and_429_on_the_api(small):
    eng = make_engine(*small, max_batch=1, max_queue=1)  # one slot: the second request waits, the third is refused
    running = serve_in_thread(create_app(eng, Settings(model="small"), ui=False))
    long = ChatRequest([Message("user", LONG_PROMPT)], Options(max_new_tokens=4000, min_new_tokens=4000,
                                                               temperature=0, focus=False, routing=False))
    handles = []
    try:
        handles.append(eng.submit(long))
        deadline = time.time() + WAIT_S
        while eng.queue_length() and time.time() < deadline:
            time.sleep(0.01)
        handles.append(eng.submit(long))  # waits: the queue is full now
        studio = build_page(eng, Settings(model="small"))[1]
        session = Session()
        _, warned = ui_send(studio, session, "hi")
        assert len(warned) == 1 and warned[0].startswith("The server is busy") and "try again in about" in warned[0]
        assert not session.busy
        r = post(running.url, body())
        assert_error(r, 429, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        for h in handles:
            h.cancel()
        for h in handles:
            list(h.events(timeout=WAIT_S))
        _, warned = ui_send(studio, Session(), "hi")
        assert not warned
        assert post(running.url, body()).status_code == 200
    finally:
        for h in handles:
            h.cancel()
        running.stop()
        eng.close()


class FakeGeneration:
    """Stands in for Generation: answers at once and leaves a per-session memory state behind."""

    def __init__(self, rt, req, emit, cancelled, memory_state=None):
        self.memory_state = object()
        self.cache, self.cache_tokens = None, 0

    def prepare(self) -> dict:
        return {"nothing": None}  # (inputs no batch takes: prefilled alone)

    def prefill_alone(self, inputs: dict) -> tuple[int, object]:
        return 0, self.memory_state

    def started(self, token: int, memory_state) -> str:
        return "stop"

    def flush(self) -> None:
        pass

    def end(self) -> Stats:
        return Stats(ttft_s=0, think_s=None, reasoning_tokens=0, answer_tokens=0, reasoning_tps=0, answer_tps=0,
                     tokens_per_second=0, prompt_tokens=1, completion_tokens=0, queue_s=0, total_s=0,
                     peak_memory={}, finish_reason="stop", attention="sdpa")


def test_per_session_state_stays_bounded_over_many_sessions(small, monkeypatch):
    monkeypatch.setattr(core, "Generation", FakeGeneration)
    eng = make_engine(*small, max_sessions=5)
    try:
        for i in range(40):
            events = list(eng.submit(ChatRequest([Message("user", "hi")], session_id=f"client-{i}")).events(
                timeout=WAIT_S))
            assert isinstance(events[-1], Done)
        assert len(eng._memory) <= 5 and len(eng._last_served) <= 5
        assert "client-39" in eng._memory and "client-0" not in eng._memory
        assert eng.queue_length() == 0
    finally:
        eng.close()


# ----------------------------------------------------------------------------- disconnects


def test_a_client_dropping_mid_stream_cancels_within_one_token_and_the_next_request_is_served(
        url, reference, submitted):
    payload = body(messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=4000, stream=True)
    after_cancel: list = []
    with httpx.Client(timeout=WAIT_S) as client:
        with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200
            handle = submitted[-1]
            put = handle._events.put

            def counting_put(event, *a, **kw):  # what the engine still emits once cancelled
                if handle.cancelled:
                    after_cancel.append(event)
                return put(event, *a, **kw)

            handle._events.put = counting_put
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
            assert len(got) >= 3
        # leaving the block closes the connection mid-stream
    deadline = time.time() + WAIT_S
    while not any(isinstance(e, (Done, Error)) for e in after_cancel) and time.time() < deadline:
        time.sleep(0.02)
    assert handle.cancelled
    texts = [e for e in after_cancel if isinstance(e, (Answer, Reasoning))]
    assert len(texts) <= 2, texts  # at most the one token being decoded when the cancel came (maybe split)
    stats = [e for e in after_cancel if isinstance(e, Stats)]
    assert stats and stats[0].finish_reason == "cancelled" and stats[0].completion_tokens < 4000
    assert_alive(url, reference)


def test_a_client_hanging_up_before_its_body_is_read_logs_no_error_and_the_server_keeps_serving(
        url, reference, caplog):
    """Headers that promise a body, half of it, then the socket closed: starlette raises ClientDisconnect while the
    body is read, which must be an info line (uvicorn logged it as an ERROR with a traceback; the load test counts
    those) and leave nothing behind."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    half = json.dumps(body()).encode()[:40]
    with caplog.at_level(logging.INFO):
        with socket.create_connection((where.hostname, where.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 4000\r\n\r\n" + half)
            time.sleep(0.3)  # the route is reading the body when the client goes
        deadline = time.time() + WAIT_S
        while "went away before its request was read" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    assert "went away before its request was read" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert_alive(url, reference)


# ----------------------------------------------------------------------------- out of memory


@pytest.fixture
def oom_once(engine, monkeypatch):
    """The next forward call(s) of the session model raise CUDA's out-of-memory error; counts cleanups."""
    model = engine.rt.model
    real = model.forward
    plan = {"calls": 0, "fail_at": {1}, "released": 0}

    def forward(*a, **kw):
        plan["calls"] += 1
        if plan["calls"] in plan["fail_at"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fault injection)")
        return real(*a, **kw)

    real_release = core.release_memory

    def release():
        plan["released"] += 1
        real_release()

    monkeypatch.setitem(model.__dict__, "forward", forward)  # removed again after the test
    monkeypatch.setattr(core, "release_memory", release)
    return plan


def released(plan: dict, times: int) -> bool:
    """Whether the worker freed memory ``times`` times, waiting a bounded while: it frees after the request's Error
    is put, so a client can read the error (and the stream's [DONE]) a moment before that."""
    deadline = time.time() + WAIT_S
    while plan["released"] < times and time.time() < deadline:
        time.sleep(0.01)
    return plan["released"] == times


def test_out_of_memory_fails_only_that_request_with_503_and_the_next_is_served(url, reference, oom_once):
    r = post(url, body())
    err = assert_error(r, 503, "out_of_memory")
    assert err["message"].startswith("the GPU ran out of memory on this request") and "max_new_tokens" in err["message"]
    assert r.headers["Retry-After"] == "1" and released(oom_once, 1)
    assert_alive(url, reference)


def test_out_of_memory_before_a_stream_starts_is_503_and_mid_stream_is_an_error_event(url, reference, oom_once,
                                                                                      engine, monkeypatch):
    assert_error(post(url, body(stream=True)), 503, "out_of_memory")
    oom_once["fail_at"] = set()  # the prefill goes through; the decoder's second step runs out of memory
    real_step, steps = engine.decoder.step, []

    def step(gens):
        steps.append(len(gens))
        if len(steps) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fault injection)")
        return real_step(gens)

    monkeypatch.setattr(engine.decoder, "step", step)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body(stream=True, max_tokens=20),
                      timeout=WAIT_S) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "out_of_memory"
    assert released(oom_once, 2)
    assert_alive(url, reference)


def test_out_of_memory_in_the_page_is_a_readable_warning(studio, ui_reference, oom_once):
    session = Session()
    _, warned = ui_send(studio, session, "hi")
    assert warned == [session.turns[-1].error] and warned[0].startswith("The GPU ran out of memory")
    assert "**Error:** The GPU ran out of memory" in session.history()[-1]["content"] and not session.busy
    assert_ui_alive(studio, ui_reference)


def test_release_memory_collects_garbage_and_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    core.release_memory()
    assert emptied == [1]
    assert core.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert core.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not core.is_out_of_memory(RuntimeError("shapes do not match"))


# ----------------------------------------------------------------------------- sessions stay apart


def test_two_page_sessions_never_see_each_others_history_or_telemetry(studio, tmp_path):
    red = write(tmp_path, "red.png", png_bytes(32, 24, "red"))
    a, b = Session(), Session()
    results: dict = {}

    def run(name, session, text_, files):
        results[name] = ui_send(studio, session, text_, files, who=name, max_new_tokens=6)

    threads = [threading.Thread(target=run, args=("alpha", a, "alpha: what is in the picture?", [red])),
               threading.Thread(target=run, args=("beta", b, "beta: hello", []))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [t.text for t in a.turns] == ["alpha: what is in the picture?"]
    assert [t.text for t in b.turns] == ["beta: hello"]
    ta, tb = a.turns[0], b.turns[0]
    assert ta.ok and tb.ok, (ta.error, tb.error)
    assert "beta" not in json.dumps(a.history()) and "alpha" not in json.dumps(b.history())
    # focus: only alpha's turn has an image, and only alpha's tokens carry image maps
    assert all(t.images for t in ta.tokens.values()) and not any(t.images for t in tb.tokens.values())
    final_b = results["beta"][0][-1]
    assert final_b[studio.page.focus_image]["visible"] is False
    # routing: each turn's load counts its own prompt and tokens only
    for turn in (ta, tb):
        assert turn.load["tokens"]["prefill"] == turn.stats.prompt_tokens
    assert ta.stats.prompt_tokens > tb.stats.prompt_tokens  # alpha's prompt holds the image patches


def test_two_api_requests_at_once_get_their_own_answers(url):
    prompts = {"alpha": "tell me about red circles", "beta": "count blue squares please"}
    alone = {k: post(url, body(messages=[{"role": "user", "content": p}], max_tokens=8)).json()
             for k, p in prompts.items()}
    together: dict = {}

    def ask(key):
        together[key] = post(url, body(messages=[{"role": "user", "content": prompts[key]}], max_tokens=8,
                                       user=key)).json()

    threads = [threading.Thread(target=ask, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k in prompts:
        assert together[k]["choices"][0]["message"]["content"] == alone[k]["choices"][0]["message"]["content"]
        assert together[k]["usage"] == alone[k]["usage"]


# ----------------------------------------------------------------------------- double click


def test_a_double_click_on_send_starts_one_turn(studio, ui_reference):
    session = Session()
    request = SimpleNamespace(session_hash="double")
    first = page_send(studio, session, "hi", request=request, max_new_tokens=4)
    next(first)  # the first click's turn has started
    with _Warnings() as caught:
        second = list(page_send(studio, session, "hi", request=request, max_new_tokens=4))
    assert len(second) == 1 and caught.messages == ["A reply is still streaming: wait for it or press Stop."]
    for _ in first:
        pass
    assert len(session.turns) == 1 and session.turns[0].ok and not session.busy
    assert session.turns[0].answer == ui_reference
    _, warned = ui_send(studio, session, "and again")  # the session is free again
    assert len(session.turns) == 2 and not warned


def test_claiming_a_session_is_atomic():
    for _ in range(20):
        session, barrier, won = Session(), threading.Barrier(4), []

        def click():
            barrier.wait(timeout=5)
            won.append(session.claim())

        threads = [threading.Thread(target=click) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=5)
        assert sorted(won) == [False, False, False, True]


# ----------------------------------------------------------------------------- security


@pytest.fixture(scope="module")
def keyed(engine):
    running = serve_in_thread(create_app(engine, Settings(model="small", api_key="s3cret-key-0001"), ui=False))
    yield running.url
    running.stop()


def test_the_api_key_is_compared_in_constant_time(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(routes.hmac, "compare_digest", spy)
    same_length_wrong = "s3cret-key-0002"
    assert_error(post(keyed, body(), headers={"Authorization": f"Bearer {same_length_wrong}"}), 401, "invalid_api_key")
    assert_error(post(keyed, body(), headers={"Authorization": "Bearer s3cret"}), 401, "invalid_api_key")
    assert_error(post(keyed, body(), headers={"Authorization": "Basic s3cret-key-0001"}), 401)
    assert calls and calls[0] == (15, 15)
    assert post(keyed, body(), headers={"Authorization": "Bearer s3cret-key-0001"}).status_code == 200


@pytest.mark.parametrize("kind", ["file URL", "absolute path", "relative path", "Windows path", "UNC path"])
def test_file_urls_and_local_paths_are_refused_and_never_opened(url, reference, tmp_path, monkeypatch, kind):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(8, 8))
    where = {"file URL": secret.as_uri(), "absolute path": str(secret), "relative path": "../secret.png",
             "Windows path": "C:\\Users\\me\\secret.png", "UNC path": "\\\\server\\share\\secret.png"}[kind]
    opened = []
    real_open = Image.open

    def spy(fp, *a, **kw):
        opened.append(fp)
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", spy)
    err = assert_error(post(url, body(messages=[user(text("x"), image(where))])), 400, "local_file_refused")
    assert "data URL" in err["message"]
    assert not any(isinstance(fp, str) or hasattr(fp, "__fspath__") for fp in opened)
    assert_alive(url, reference)


def test_remote_image_urls_are_fetched_only_when_enabled(engine, tmp_path):
    (tmp_path / "cat.png").write_bytes(png_bytes(20, 10))
    hits = []

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            hits.append(args)

    http = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    cat = f"http://127.0.0.1:{http.server_port}/cat.png"
    closed = serve_in_thread(create_app(engine, Settings(model="small"), ui=False))
    opened = serve_in_thread(create_app(engine, Settings(model="small", allow_remote_images=True), ui=False))
    try:
        assert_error(post(closed.url, body(messages=[user(text("x"), image(cat))])), 400, "remote_url_disabled")
        assert hits == []  # not even a request went out
        assert post(opened.url, body(messages=[user(text("x"), image(cat))])).status_code == 200
        assert len(hits) == 1
    finally:
        closed.stop()
        opened.stop()
        http.shutdown()


def test_cors_is_closed_by_default_and_opens_only_to_the_listed_origins(url, engine):
    evil = {"Origin": "http://evil.example"}
    preflight = {**evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    for path in ("/v1/models", "/health", "/"):
        assert "access-control-allow-origin" not in httpx.get(url + path, headers=evil).headers, path
    assert "access-control-allow-origin" not in post(url, body(), headers=evil).headers

    running = serve_in_thread(create_app(engine, Settings(model="small", cors_origins=["http://app.example"]),
                                         ui=False))
    try:
        ok = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "content-type"}
        r = httpx.options(running.url + "/v1/chat/completions", headers=ok)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = post(running.url, body(), headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(running.url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    finally:
        running.stop()


def test_no_image_or_audio_bytes_or_prompt_text_in_the_logs(url, caplog):
    img = data_url(noise_png(16, 16))
    rec = audio_part(wav_bytes(0.3))
    payloads = [img.split(",", 1)[1], rec["input_audio"]["data"]]
    caplog.set_level(logging.DEBUG)
    secret_text = "my-private-question-7731"
    assert post(url, body(messages=[user(text(secret_text), image(img), rec)])).status_code == 200
    bad = post(url, body(messages=[user(text(secret_text), image("data:image/png;base64," + payloads[1][:400]))]))
    assert bad.status_code == 400
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "request" in logged  # the request was logged ...
    for p in payloads:  # ... without its media (not even a fragment)
        assert p[:40] not in logged and p[-40:] not in logged
    assert secret_text not in logged


def test_a_warning_at_start_when_listening_beyond_loopback_without_a_key(monkeypatch, caplog):
    assert startup_warnings(Settings(model="small")) == []
    assert startup_warnings(Settings(model="small", host="::1")) == []
    assert startup_warnings(Settings(model="small", host="localhost")) == []
    [warning] = startup_warnings(Settings(model="small", host="0.0.0.0"))
    assert "0.0.0.0:8000" in warning and "--api-key" in warning
    assert startup_warnings(Settings(model="small", host="0.0.0.0", api_key="k")) == []
    assert "share" in startup_warnings(Settings(model="small", share=True))[0]
    assert any("'*'" in w for w in startup_warnings(Settings(model="small", cors_origins=["*"])))
    assert any("trust-remote-code" in w for w in startup_warnings(Settings(model="small", trust_remote_code=True)))

    # app.py logs them before it serves
    import uvicorn

    import app as entry
    from autoglm_app import server

    monkeypatch.setattr(server, "load_engine", lambda settings: None)
    monkeypatch.setattr(server, "create_app", lambda engine, settings: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    caplog.set_level(logging.WARNING)
    assert entry.main(["--host", "0.0.0.0", "--port", "8123"]) == 0
    assert any("without --api-key" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_trust_remote_code_is_off_unless_asked_and_reaches_the_loader(monkeypatch, small):
    from autoglm_app import server
    from autoglm_app.loading import checkpoints as loading

    seen = []

    def load_model(name, quantize=None, gpus=None, gpu_memory=None, attn_implementation="sdpa",
                   trust_remote_code=False, seed=0):
        seen.append(trust_remote_code)
        return loading.LoadedModel(model=small[0], processor=small[1], model_id="x", quantize="fp32",
                                   device_map=None, plan=None)

    monkeypatch.setattr(loading, "load_model", load_model)
    for argv, expected in (([], False), (["--trust-remote-code"], True)):
        eng = server.load_engine(parse_settings(["--model", "some/dir", *argv]))
        eng.close()
        assert seen[-1] is expected
