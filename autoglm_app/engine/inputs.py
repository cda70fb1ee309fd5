"""Turn what clients send into what the processor wants: RGB-able images, 16 kHz mono float audio."""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image

from .events import Audio, BadRequest

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
