"""Turn what clients send into what the processor wants: RGB-able images, 16 kHz mono float audio.

Shared by every way in (the API, the page, a remote backend): ``open_image`` reads image bytes
checking the pixel count before decoding any pixel (decompression bombs) and keeps the first frame
of an animation; ``clean_text`` drops control characters; ``validate_request`` checks options,
limits and media against the server's ``Limits`` (``autoglm_app.config``).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import replace
from typing import IO, Callable

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image, UnidentifiedImageError

from ..config import Limits
from ..events import MAX_TOP_LOGPROBS, Audio, BadRequest, ChatRequest, Message

TARGET_RATE = 16000
MIN_TEMPERATURE = 1e-3  # below this (and above 0) sampling is numerically greedy: treated as 0

# C0 and C1 control characters except tab, newline and carriage return; lone UTF-16 surrogates
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class ImageTooLarge(BadRequest):
    """An image over the pixel limit (the API answers 413)."""


def clean_text(text: str | None) -> str:
    """Text as the model gets it: control characters (NUL, ESC, ...) and lone surrogates removed;
    tab, newline and carriage return kept."""
    return _CONTROL.sub("", text or "")


def open_image(source: bytes | IO[bytes] | str, max_pixels: int = Limits.max_image_pixels) -> Image.Image:
    """Image bytes, a file object or a path -> a loaded single-frame PIL image.

    The header's size is checked against ``max_pixels`` before any pixel is decoded; an animated
    image (GIF, APNG, WebP) gives its first frame. Any mode is kept (the processor converts).
    """
    undecodable = BadRequest("the image could not be decoded: send PNG, JPEG, WebP, GIF or BMP data")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image = Image.open(source)
    except Image.DecompressionBombError as e:  # PIL's own guard (far over ours) fired on the header
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLarge(f"the image has {size}; the limit is {max_pixels:,}: scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise undecodable from None
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise BadRequest("the image is empty (0 pixels)")
        if width * height > max_pixels:
            raise ImageTooLarge(f"the image is {width}x{height} pixels; the limit is {max_pixels:,}: scale it down")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if getattr(image, "is_animated", False):
                    image.seek(0)  # an animation: its first frame (the others are never decoded)
                image.load()
                return image.copy()  # a plain single-frame image, detached from the file
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise undecodable from None
    finally:
        image.close()


def to_mono_16k(audio: Audio, max_seconds: float) -> np.ndarray:
    """Any rate, mono or stereo (frames, channels) or (channels, frames), int or float -> float32 16 kHz mono.

    The length is checked before any sample is converted, so an over-long recording costs nothing."""
    x = np.asarray(audio.samples)
    if x.size == 0:
        raise BadRequest("the recording is empty: record or upload a few seconds of audio")
    if audio.sample_rate is None or not 1000 <= int(audio.sample_rate) <= 384000:
        raise BadRequest(f"unsupported sample rate {audio.sample_rate}: send audio between 1 kHz and 384 kHz")
    if x.ndim not in (1, 2):
        raise BadRequest(f"audio must be 1-D (mono) or 2-D (multi-channel), got shape {x.shape}")
    frames = x.shape[0] if x.ndim == 1 else max(x.shape)  # channels are the short axis
    seconds = frames / audio.sample_rate
    if seconds > max_seconds:
        raise BadRequest(f"the recording is {seconds:.1f} s long; the limit is {max_seconds:g} s: "
                         "send a shorter clip")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise BadRequest(f"unsupported audio sample type {x.dtype}: send integer PCM or float samples")
    if x.ndim == 2:
        # channels are the short axis: (frames, channels) from browsers and soundfile
        x = x.mean(axis=1) if x.shape[1] <= x.shape[0] else x.mean(axis=0)
    if not np.isfinite(x).all():
        raise BadRequest("the recording holds NaN or infinite samples")
    if audio.sample_rate != TARGET_RATE:
        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(audio.sample_rate), TARGET_RATE).numpy()
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def check_image(image, max_pixels: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadRequest("an image could not be read: send PNG, JPEG, WebP, GIF or BMP data")
    if image.width < 1 or image.height < 1:
        raise BadRequest("the image is empty (0 pixels)")
    if image.width * image.height > max_pixels:
        raise ImageTooLarge(f"the image is {image.width}x{image.height} pixels; the limit is {max_pixels:,}: "
                            "scale it down")
    return image


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_options(o, limits: Limits):
    """Sampling options in range (a BadRequest naming the field otherwise); returns them normalised."""
    context_limit = limits.context_limit
    if isinstance(o.max_new_tokens, bool) or not isinstance(o.max_new_tokens, int) \
            or not 1 <= o.max_new_tokens <= context_limit:
        raise BadRequest(f"max_new_tokens (max_tokens) must be an integer between 1 and {context_limit}, "
                         f"got {o.max_new_tokens!r}")
    if isinstance(o.min_new_tokens, bool) or not isinstance(o.min_new_tokens, int) \
            or not 0 <= o.min_new_tokens <= o.max_new_tokens:
        raise BadRequest(f"min_new_tokens (min_tokens) must be an integer between 0 and max_tokens "
                         f"({o.max_new_tokens}), got {o.min_new_tokens!r}")
    temperature = _number(o.temperature, "temperature")
    if not 0 <= temperature <= 5:
        raise BadRequest(f"temperature must be between 0 and 5, got {o.temperature!r}")
    if not 0 < _number(o.top_p, "top_p") <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {o.top_p!r}")
    if isinstance(o.top_k, bool) or not isinstance(o.top_k, int) or o.top_k < 0:
        raise BadRequest(f"top_k must be 0 (off) or a positive integer, got {o.top_k!r}")
    if not 0 < _number(o.repetition_penalty, "repetition_penalty") <= 10:
        raise BadRequest(f"repetition_penalty must be in (0, 10], got {o.repetition_penalty!r}")
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int)
                               or not -2**63 <= o.seed < 2**64):
        raise BadRequest(f"seed must be an integer between -2**63 and 2**64 - 1, got {o.seed!r}")
    stop = [clean_text(s) for s in o.stop or []]
    if len(stop) > limits.max_stop_strings or any(len(s) > 1000 for s in stop):
        raise BadRequest(f"stop takes at most {limits.max_stop_strings} strings of at most 1000 characters")
    if o.logprobs is not None and (isinstance(o.logprobs, bool) or not isinstance(o.logprobs, int)
                                   or not 0 <= o.logprobs <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {o.logprobs!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        temperature = 0.0  # numerically greedy anyway; dividing the logits by it would overflow
    return replace(o, temperature=temperature, stop=stop)


def validate_request(request: ChatRequest, limits: Limits, hears_audio: bool = True,
                     transcribe: Callable[[Audio], str] | None = None) -> ChatRequest:
    """Check a request and convert its media (16 kHz mono audio; a transcript for a model that does
    not hear). Everything a client can get wrong is a BadRequest that says what to change.

    ``limits.max_images_per_turn`` counts one user message; text loses its control characters."""
    if not request.messages:
        raise BadRequest("messages is empty: send at least one user message")
    if request.messages[-1].role != "user":
        raise BadRequest("the last message must be from the user")
    options = check_options(request.options, limits)
    forced = request.continue_from
    if not isinstance(forced, list) or len(forced) >= limits.context_limit or \
            any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in forced):
        raise BadRequest("continue_from must be a list of token ids (non-negative integers) shorter than the "
                         f"{limits.context_limit}-token context")
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in ("system", "user", "assistant"):
            raise BadRequest(f"unknown role {m.role!r}: use system, user or assistant")
        if len(m.images) > limits.max_images_per_turn:
            raise BadRequest(f"{len(m.images)} images in one turn (message {i}); the limit is "
                             f"{limits.max_images_per_turn}: send fewer images per message")
        images = [check_image(img, limits.max_image_pixels) for img in m.images]
        audios = [Audio(to_mono_16k(a, limits.max_audio_seconds), TARGET_RATE) for a in m.audios]
        text = clean_text(m.text)
        if audios and not hears_audio:
            if transcribe is None:
                raise BadRequest("this model does not hear audio: start the server with --asr-model "
                                 "(a Whisper checkpoint) or send a transcript as text")
            text = " ".join([*(transcribe(a) for a in audios), text]).strip()
            audios = []
        messages.append(Message(m.role, text, images, audios))
    if not (messages[-1].text.strip() or messages[-1].images or messages[-1].audios):
        raise BadRequest("the last user message is empty: type a question, or attach an image or a recording")
    return replace(request, messages=messages, options=options)
