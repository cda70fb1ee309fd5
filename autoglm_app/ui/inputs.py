"""What the user sends, read into a ``Turn``: uploaded images and recordings, the generation
settings, and the shipped examples.

Only the checks that must come before a file is read happen here: its size on disk, the number of
images in the turn, a recording's length from its header and an image's pixel count from its header
(``engine.inputs.open_image``). The engine's ``validate_request`` is the authority for the rest
(option ranges, sample rates, empty recordings, ...). Limits come from ``settings.limits``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
from PIL import Image

from ..config import ASSETS, Settings
from ..engine.inputs import ImageTooLarge, clean_text, open_image
from ..events import Audio, BadRequest, Options
from .session import CONTEXT_MODES, Session, Turn, as_sentence

log = logging.getLogger(__name__)

EXAMPLES_DIR = ASSETS / "examples"
AUDIO_SUFFIXES = {".wav", ".wave", ".mp3", ".ogg", ".oga", ".flac", ".webm", ".m4a", ".aac", ".opus"}
WAV_SUFFIXES = (".wav", ".wave")


class InputError(Exception):
    """Something the user sent cannot be used; the message says what to do."""


def file_path(item: Any) -> str:
    """A Gradio file value (a dict with "path", or a path) -> its path."""
    return item.get("path") if isinstance(item, dict) else str(item)


def check_size(path: str, what: str, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise InputError(f"Could not read {Path(path).name}: upload it again.") from e
    if size > max_bytes:
        raise InputError(f"The {what} {Path(path).name} is {size / 2**20:.1f} MiB; the limit is "
                         f"{max_bytes / 2**20:g} MiB: send a smaller one.")


def _sample_type(subtype: str) -> str:
    """The numpy type that holds a file's samples without loss (16-bit PCM stays int16)."""
    if subtype in ("PCM_24", "PCM_32"):
        return "int32"
    if subtype in ("FLOAT", "DOUBLE"):
        return "float32"
    return "int16"


def read_audio(path: str, max_seconds: float | None = None, max_bytes: int | None = None) -> Audio:
    """A recording file -> Audio. What soundfile reads (WAV, FLAC, OGG, MP3) has its length checked
    from the header before any sample is decoded; other formats need ffmpeg (via gradio)."""
    name = Path(path).name
    check_size(path, "recording", max_bytes)
    try:
        try:
            info = sf.info(path)
        except sf.LibsndfileError:
            if Path(path).suffix.lower() in WAV_SUFFIXES:
                raise
            from gradio.processing_utils import audio_from_file  # webm, m4a, ...: ffmpeg

            rate, samples = audio_from_file(path)
            return Audio(samples, rate)
        if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise InputError(f"The recording {name} is {info.frames / info.samplerate:.0f} s long; the limit is "
                             f"{max_seconds:g} s: send a shorter clip.")
        samples, rate = sf.read(path, dtype=_sample_type(info.subtype), always_2d=False)
        return Audio(samples, rate)
    except InputError:
        raise
    except Exception as e:  # unreadable or unsupported file: the user can fix it
        log.info("could not read audio %s: %s", name, type(e).__name__)
        raise InputError(f"Could not read the recording {name}: send a WAV file (16-bit PCM).") from e


def read_image(path: str, max_pixels: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """An image file -> a single-frame PIL image (an animation's first frame), its pixel count checked
    before the pixels are decoded."""
    name = Path(path).name
    check_size(path, "image", max_bytes)
    try:
        return open_image(path, **({} if max_pixels is None else {"max_pixels": max_pixels}))
    except ImageTooLarge as e:
        raise InputError(f"{name}: {as_sentence(str(e))}.") from e
    except (BadRequest, OSError) as e:
        raise InputError(f"Could not read {name} as an image: send PNG, JPEG, WebP, GIF or BMP.") from e


def make_turn(text: str, files: list, recording: str | None, options: Options,
              settings: Settings | None = None) -> Turn:
    """What the user sent -> a new Turn (images and recording read within the settings' limits, nothing
    sent yet). Control characters are dropped from the text, as the engine drops them."""
    limits = (settings or Settings(model="")).limits
    turn = Turn(text=clean_text(text).strip(), options=options)
    recordings = [recording] if recording else []
    image_paths = []
    for item in files or []:
        path = file_path(item)
        (recordings if Path(path).suffix.lower() in AUDIO_SUFFIXES else image_paths).append(path)
    if len(image_paths) > limits.max_images_per_turn:
        raise InputError(f"{len(image_paths)} images in one turn; the limit is {limits.max_images_per_turn}: "
                         "send fewer images.")
    if len(recordings) > 1:  # a turn holds one recording
        raise InputError("Send one recording per turn (record or attach just one).")
    if not (turn.text or image_paths or recordings):  # nothing to make a turn of: no turn, just a warning
        raise InputError("Type a question, attach an image, or record a question first.")
    for path in image_paths:
        turn.images.append(read_image(path, limits.max_image_pixels, limits.max_upload_bytes))
        turn.image_paths.append(path)
    if recordings:
        turn.audio = read_audio(recordings[0], limits.max_audio_seconds, limits.max_upload_bytes)
        turn.audio_path = recordings[0]
    return turn


# The page's generation settings: (element id, label, minimum, maximum) of each slider, in the order the
# handlers take them. The sliders are built from this table and the Send button's browser-side check
# (layout.SETTINGS_CHECK_JS) reads it, so a typed value outside a slider's range is caught, not clamped.
SLIDERS = (("temperature", "Temperature", 0.0, 2.0), ("top-p", "Top-p", 0.05, 1.0),
           ("max-tokens", "Max new tokens", 1, None), ("top-k", "Top-k (0 = off)", 0, 200),
           ("repetition-penalty", "Repetition penalty", 1.0, 2.0))
MAX_STOP_SEQUENCES = 4


def _typed_problems(typed: str | None) -> list[str]:
    """What the browser-side check found outside a slider's range (a JSON object: label -> typed value)."""
    if not typed:
        return []
    try:
        bad = json.loads(typed)
    except (TypeError, ValueError):
        return []
    return [f"{label} {value}" for label, value in bad.items()] if isinstance(bad, dict) else []


# every page turn asks for each token's logprob and this many alternatives (the word panel's colours and its
# alternatives to branch from); measured cost in docs/PERFORMANCE.md ("Logprobs")
PAGE_ALTERNATIVES = 5


def make_options(thinking: bool, temperature: float, top_p: float, max_new_tokens: float, seed: float | None,
                 top_k: float = 0, repetition_penalty: float = 1.0, stop: str = "",
                 typed: str | None = None) -> Options:
    """The generation settings as engine Options. A value out of its range (typed into a slider's box, or
    a seed below -1) is an InputError that names it, so nothing is sent; the engine checks again."""
    problems = _typed_problems(typed)
    if problems:
        raise InputError(f"Out of range: {', '.join(problems)}. Each slider shows its range: fix the value "
                         "(nothing was sent).")
    try:
        seed_value = None if seed is None or float(seed) == -1 else float(seed)
        if seed_value is not None and (seed_value < 0 or seed_value != int(seed_value)):
            raise InputError(f"Seed {seed:g} is not valid: use -1 for a random seed or a whole number from 0 "
                             "(nothing was sent).")
        stops = [line for line in (stop or "").splitlines() if line]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InputError(f"{len(stops)} stop sequences; the limit is {MAX_STOP_SEQUENCES}, one per line "
                             "(nothing was sent).")
        return Options(enable_thinking=bool(thinking), temperature=float(temperature), top_p=float(top_p),
                       max_new_tokens=int(max_new_tokens), seed=None if seed_value is None else int(seed_value),
                       top_k=int(top_k or 0), repetition_penalty=float(repetition_penalty or 1.0), stop=stops,
                       logprobs=PAGE_ALTERNATIVES)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError("The generation settings hold a value that is not a number: reset them and "
                         "try again.") from e


def fingerprint(path: str | None) -> str | None:
    """The recording's content hash: the same recording whichever component or copy it comes from."""
    if not path:
        return None
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def recording_of(prompt: dict | None, recording: str | None) -> str | None:
    """The recording in the inputs: the microphone's, else the first audio file attached to the box."""
    if recording:
        return recording
    for item in (prompt or {}).get("files") or []:
        if Path(file_path(item)).suffix.lower() in AUDIO_SUFFIXES:
            return file_path(item)
    return None


# ----------------------------------------------------------------------------- the shipped examples


def load_examples(directory: Path = EXAMPLES_DIR) -> list[dict]:
    path = directory / "examples.json"
    if not path.exists():
        log.warning("no examples at %s", path)
        return []
    items = json.loads(path.read_text(encoding="utf-8"))
    for ex in items:
        for key in ("image", "audio"):
            ex[key] = str(directory / ex[key]) if ex.get(key) else None
    return items


def example_label(ex: dict) -> str:
    if ex.get("text"):
        return ex["text"]
    if ex.get("transcript"):
        return f"(spoken) “{ex['transcript']}”"
    return "(spoken question)"


def example_caption(ex: dict) -> str:
    """One line per example: what it sends, then the question."""
    media = [Path(ex[k]).name for k in ("image", "audio") if ex.get(k)]
    return (" + ".join(media) + ": " if media else "") + example_label(ex)


def chat_example(ex: dict) -> dict:
    """An example as the empty Chatbot shows it (a card with a thumbnail)."""
    card: dict = {"display_text": example_label(ex), "text": ex.get("text") or ""}
    if ex.get("image"):
        card["icon"] = ex["image"]
    return card


@dataclass
class Controls:
    """The generation settings as the page sends them with every Send / Regenerate / edit (``SETTINGS``)."""

    thinking: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: float = 512
    seed: float | None = -1
    top_k: float = 0
    repetition_penalty: float = 1.0
    stop: str | None = ""
    system: str | None = ""
    context_mode: str | None = None  # None: the session's own choice (an API client that does not send it)
    typed: str | None = None  # the browser-side check's findings: slider boxes typed out of range

    def options(self) -> Options:
        return make_options(self.thinking, self.temperature, self.top_p, self.max_new_tokens, self.seed, self.top_k,
                            self.repetition_penalty, self.stop, self.typed)

    def sliders(self) -> list:
        """The sliders' values in ``inputs.SLIDERS`` order."""
        return [self.temperature, self.top_p, self.max_new_tokens, self.top_k, self.repetition_penalty]

    def multi_turn(self, session: Session) -> bool:
        return session.multi_turn if self.context_mode not in CONTEXT_MODES else self.context_mode == CONTEXT_MODES[1]
