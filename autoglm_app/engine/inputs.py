"""Turn what clients send into what the processor wants: RGB-able images, 16 kHz mono float audio."""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image

from dataclasses import replace
from typing import Callable

from .events import Audio, BadRequest, ChatRequest, Message

TARGET_RATE = 16000
MAX_IMAGE_PIXELS = 40_000_000


def to_mono_16k(audio: Audio, max_seconds: float) -> np.ndarray:
    """Any rate, mono or stereo (frames, channels) or (channels, frames), int or float -> float32 16 kHz mono."""
    x = np.asarray(audio.samples)
    if x.size == 0:
        raise BadRequest("the recording is empty: record or upload a few seconds of audio")
    if audio.sample_rate is None or not 1000 <= int(audio.sample_rate) <= 384000:
        raise BadRequest(f"unsupported sample rate {audio.sample_rate}: send audio between 1 kHz and 384 kHz")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise BadRequest(f"unsupported audio sample type {x.dtype}: send integer PCM or float samples")
    if x.ndim == 2:
        # channels are the short axis: (frames, channels) from browsers and soundfile
        x = x.mean(axis=1) if x.shape[1] <= x.shape[0] else x.mean(axis=0)
    elif x.ndim != 1:
        raise BadRequest(f"audio must be 1-D (mono) or 2-D (multi-channel), got shape {x.shape}")
    seconds = x.shape[0] / audio.sample_rate
    if seconds > max_seconds:
        raise BadRequest(f"the recording is {seconds:.1f} s long; the limit is {max_seconds:.0f} s: send a shorter clip")
    if not np.isfinite(x).all():
        raise BadRequest("the recording holds NaN or infinite samples")
    if audio.sample_rate != TARGET_RATE:
        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(audio.sample_rate), TARGET_RATE).numpy()
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadRequest("an image could not be read: send PNG, JPEG, WebP, GIF or BMP data")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise BadRequest(f"the image is {image.width}x{image.height}; the limit is {MAX_IMAGE_PIXELS:,} pixels")
    if image.width < 1 or image.height < 1:
        raise BadRequest("the image is empty")
    return image


def validate_request(request: ChatRequest, context_limit: int, max_audio_seconds: float, max_images: int,
                     hears_audio: bool = True, transcribe: Callable[[Audio], str] | None = None) -> ChatRequest:
    """Check a request and convert its media (16 kHz mono audio; a transcript for a model that does
    not hear). Everything a client can get wrong is a BadRequest that says what to change."""
    if not request.messages:
        raise BadRequest("messages is empty: send at least one user message")
    if request.messages[-1].role != "user":
        raise BadRequest("the last message must be from the user")
    o = request.options
    if not 1 <= o.max_new_tokens <= context_limit:
        raise BadRequest(f"max_new_tokens must be between 1 and {context_limit}")
    if o.temperature < 0 or o.temperature > 5:
        raise BadRequest("temperature must be between 0 and 5")
    if not 0 < o.top_p <= 1:
        raise BadRequest("top_p must be in (0, 1]")
    if o.top_k < 0:
        raise BadRequest("top_k must be 0 (off) or positive")
    if not 0 < o.repetition_penalty <= 10:
        raise BadRequest("repetition_penalty must be in (0, 10]")
    messages, n_images = [], 0
    for m in request.messages:
        if m.role not in ("system", "user", "assistant"):
            raise BadRequest(f"unknown role {m.role!r}: use system, user or assistant")
        images = [check_image(img) for img in m.images]
        n_images += len(images)
        audios = [Audio(to_mono_16k(a, max_audio_seconds), TARGET_RATE) for a in m.audios]
        text = m.text or ""
        if audios and not hears_audio:
            if transcribe is None:
                raise BadRequest("this model does not hear audio: start the server with --asr-model "
                                 "(a Whisper checkpoint) or send a transcript as text")
            text = " ".join([*(transcribe(a) for a in audios), text]).strip()
            audios = []
        messages.append(Message(m.role, text, images, audios))
    if n_images > max_images:
        raise BadRequest(f"{n_images} images in the conversation; the limit is {max_images}")
    if not (messages[-1].text.strip() or messages[-1].images or messages[-1].audios):
        raise BadRequest("the last user message is empty: type a question, or attach an image or a recording")
    return replace(request, messages=messages)
