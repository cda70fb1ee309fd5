"""Decode the media an OpenAI client sends: ``image_url`` parts into PIL images, ``input_audio`` into ``Audio``.

Images come as data URLs (``data:image/png;base64,...``) or, only when the server allows it,
as remote http(s) URLs. Local ``file:`` URLs are never read. Audio comes as base64 bytes of
a WAV / FLAC (anything libsndfile reads: OGG, MP3 with libsndfile >= 1.1) file.

This is the API's edge: what must be checked before anything is decoded is checked here, against
the server's ``Limits`` (decoded bytes from the base64 length, or while a remote image streams in;
pixels from the image header; seconds from the audio header). Everything else about the media is
the engine's ``validate_request``. Problems raise ``MediaError`` with a message that says what to
send instead; ``too_large`` marks the ones that are about size (the API turns those into 413).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
from PIL import Image

from ..events import Audio, BadRequest
from ..config import Limits
from ..engine.inputs import ImageTooLarge
from ..engine.inputs import open_image as read_image_bytes

log = logging.getLogger(__name__)

REMOTE_TIMEOUT_S = 10.0


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class MediaError(ValueError):
    """An image or recording that cannot be used as sent."""

    def __init__(self, message: str, too_large: bool = False, code: str | None = None):
        super().__init__(message)
        self.too_large = too_large
        self.code = code


def decoded_size(data: str) -> int:
    """The number of bytes base64 ``data`` (whitespace removed) decodes to, read from its length."""
    return len(data) * 3 // 4 - data[-2:].count("=")


def decode_base64(data: str, what: str, max_bytes: int) -> bytes:
    """Strict base64 (whitespace ignored), refusing anything over the byte limit before decoding it."""
    data = "".join(data.split())
    if decoded_size(data) > max_bytes:
        raise MediaError(f"the {what} is over {_mib(max_bytes)}: send a smaller one", too_large=True)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"the {what} is not valid base64") from None


def split_data_url(url: str, max_bytes: int) -> tuple[str, bytes]:
    """'data:image/png;base64,AAAA' -> ('image/png', raw bytes)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("malformed data URL: expected data:<mime type>;base64,<data>")
    mime, *params = header[len("data:"):].split(";")
    if "base64" not in params:
        raise MediaError("only base64 data URLs are supported: data:<mime type>;base64,<data>")
    return mime, decode_base64(payload, "image", max_bytes)


def fetch_remote(url: str, max_bytes: int) -> bytes:
    """GET an http(s) URL, refusing a body over the byte limit as soon as it is (not after it is all read)."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as r:
            if r.status_code != 200:
                raise MediaError(f"fetching the image URL returned HTTP {r.status_code}")
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise MediaError(f"the image at the URL is over {_mib(max_bytes)}", too_large=True)
            return bytes(body)
    except httpx.HTTPError as e:
        raise MediaError(f"the image URL could not be fetched ({type(e).__name__}): "
                         "check the URL, or send the image as a data URL") from None


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Image bytes (already within the byte limit) -> a loaded single-frame PIL image, checking the
    pixel count from the header before decoding the pixels (an animation gives its first frame)."""
    try:
        return read_image_bytes(raw, max_pixels)
    except ImageTooLarge as e:
        raise MediaError(str(e), too_large=True) from None
    except BadRequest as e:
        raise MediaError(str(e)) from None


def load_image_url(url: str, allow_remote: bool, limits: Limits) -> Image.Image:
    """An OpenAI ``image_url.url`` -> PIL image. Only data URLs (and http(s) when allowed) are read:
    ``file:`` URLs and local paths never are."""
    scheme = urlsplit(url.strip()[:16]).scheme.lower()
    if scheme == "data":
        mime, raw = split_data_url(url.strip(), limits.max_upload_bytes)
        if mime and not mime.startswith("image/"):
            raise MediaError(f"the data URL holds {mime!r}, not an image")
        return open_image(raw, limits.max_image_pixels)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError("remote image URLs are turned off on this server: send the image inline as a "
                             "data URL (data:image/png;base64,...), or start the server with --allow-remote-images",
                             code="remote_url_disabled")
        log.info("fetching remote image %s", url[:200])
        return open_image(fetch_remote(url, limits.max_upload_bytes), limits.max_image_pixels)
    if scheme == "file":
        raise MediaError("file: URLs are never read: send the image inline as a data URL (data:image/png;base64,...)",
                         code="local_file_refused")
    if not scheme or len(scheme) == 1:  # /etc/x.png, ../x.png, C:\\x.png, \\\\server\\share\\x.png
        raise MediaError("local file paths are never read: send the image inline as a data URL "
                         "(data:image/png;base64,...)", code="local_file_refused")
    raise MediaError(f"unsupported image URL scheme {scheme!r}: send a data URL (data:image/png;base64,...)")


def load_input_audio(data: str, fmt: str | None, limits: Limits) -> Audio:
    """An OpenAI ``input_audio`` ({"data": base64, "format": "wav"}) -> Audio at its own rate.

    The length is read from the header first: an over-long recording is refused before decoding."""
    raw = decode_base64(data, "recording", limits.max_upload_bytes)
    undecodable = MediaError(f"the input_audio could not be decoded as {fmt or 'audio'}: "
                             "send base64 WAV or FLAC data with the matching format")
    if not raw:
        raise MediaError("the recording is empty: send a few seconds of WAV or FLAC audio")
    try:
        info = sf.info(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise undecodable from None
    if info.frames <= 0:
        raise MediaError("the recording is empty (no samples): send a few seconds of audio")
    seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    if seconds > limits.max_audio_seconds:
        raise MediaError(f"the recording is {seconds:.1f} s long; the limit is "
                         f"{limits.max_audio_seconds:g} s: send a shorter clip", code="audio_too_long")
    try:
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise undecodable from None
    return Audio(np.asarray(samples), int(rate))
