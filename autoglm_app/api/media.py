"""Decode the media an OpenAI client sends: ``image_url`` parts into PIL images, ``input_audio`` into ``Audio``.

Images come as data URLs (``data:image/png;base64,...``) or, only when the server allows it,
as remote http(s) URLs. Local ``file:`` URLs are never read. Audio comes as base64 bytes of
a WAV / FLAC (anything libsndfile reads: OGG, MP3 with libsndfile >= 1.1) file.

Problems raise ``MediaError`` with a message that says what to send instead; ``too_large``
marks the ones that are about size (the API turns those into 413).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import warnings
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from ..engine.events import Audio

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 16 * 2**20  # one decoded image or recording
MAX_IMAGE_PIXELS = 40_000_000  # the engine's limit too (engine/inputs.py)
REMOTE_TIMEOUT_S = 10.0


class MediaError(ValueError):
    """An image or recording that cannot be used as sent."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def decode_base64(data: str, what: str) -> bytes:
    """Strict base64 (whitespace ignored), refusing anything over MAX_MEDIA_BYTES before decoding it."""
    data = "".join(data.split())
    if len(data) // 4 * 3 > MAX_MEDIA_BYTES + 2:
        raise MediaError(f"the {what} is over {MAX_MEDIA_BYTES // 2**20} MiB: send a smaller one", too_large=True)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"the {what} is not valid base64") from None


def split_data_url(url: str) -> tuple[str, bytes]:
    """'data:image/png;base64,AAAA' -> ('image/png', raw bytes)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("malformed data URL: expected data:<mime type>;base64,<data>")
    mime, *params = header[len("data:"):].split(";")
    if "base64" not in params:
        raise MediaError("only base64 data URLs are supported: data:<mime type>;base64,<data>")
    return mime, decode_base64(payload, "image")


def fetch_remote(url: str) -> bytes:
    """GET an http(s) URL, refusing bodies over MAX_MEDIA_BYTES."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as r:
            if r.status_code != 200:
                raise MediaError(f"fetching the image URL returned HTTP {r.status_code}")
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > MAX_MEDIA_BYTES:
                    raise MediaError(f"the image at the URL is over {MAX_MEDIA_BYTES // 2**20} MiB", too_large=True)
            return bytes(body)
    except httpx.HTTPError as e:
        raise MediaError(f"the image URL could not be fetched ({type(e).__name__}): "
                         "check the URL, or send the image as a data URL") from None


def open_image(raw: bytes) -> Image.Image:
    """Image bytes -> a loaded PIL image, checking the pixel count before decoding the pixels."""
    if len(raw) > MAX_MEDIA_BYTES:
        raise MediaError(f"the image is over {MAX_MEDIA_BYTES // 2**20} MiB: send a smaller one", too_large=True)
    undecodable = MediaError("the image could not be decoded: send PNG, JPEG, WebP, GIF or BMP data")
    bomb = MediaError("the image has too many pixels: scale it down", too_large=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise bomb from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise undecodable from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise MediaError(f"the image is {image.width}x{image.height} pixels; the limit is "
                         f"{MAX_IMAGE_PIXELS:,}: scale it down", too_large=True)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise undecodable from None
    return image


def load_image_url(url: str, allow_remote: bool) -> Image.Image:
    """An OpenAI ``image_url.url`` -> PIL image."""
    scheme = urlsplit(url.strip()[:16]).scheme.lower()
    if scheme == "data":
        mime, raw = split_data_url(url.strip())
        if mime and not mime.startswith("image/"):
            raise MediaError(f"the data URL holds {mime!r}, not an image")
        return open_image(raw)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError("remote image URLs are turned off on this server: send the image inline as a "
                             "data URL (data:image/png;base64,...), or start the server with --allow-remote-images")
        log.info("fetching remote image %s", url[:200])
        return open_image(fetch_remote(url))
    if scheme == "file":
        raise MediaError("file: URLs are never read: send the image inline as a data URL (data:image/png;base64,...)")
    raise MediaError(f"unsupported image URL scheme {scheme or '(none)'!r}: "
                     "send a data URL (data:image/png;base64,...)")


def load_input_audio(data: str, fmt: str | None) -> Audio:
    """An OpenAI ``input_audio`` ({"data": base64, "format": "wav"}) -> Audio at its own rate."""
    raw = decode_base64(data, "recording")
    try:
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise MediaError(f"the input_audio could not be decoded as {fmt or 'audio'}: "
                         "send base64 WAV or FLAC data with the matching format") from None
    return Audio(np.asarray(samples), int(rate))
