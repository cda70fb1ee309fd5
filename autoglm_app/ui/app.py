"""The AutoGLM Studio page: chat on the left, Focus | Routing | Model | Export tabs on the right.

``build_ui(engine, settings)`` lays the page out and wires its events; ``mount_ui``
mounts it at "/" of the server's FastAPI app. Handlers are small: they turn a user
action into a ``Turn``, let ``stream_turn`` fold the engine's events into the
session, and render the session with the pure functions of ``render``. The page
only ever talks to the engine (``submit``, ``info``), never to the model.

Named API endpoints (gradio_client): ``/chat`` (text, images, audio, settings ->
history), ``/stop``, ``/regenerate``, ``/clear``, ``/export``; ``/send`` is the page's
own multimodal-box endpoint; ``/transcribe`` exists for a model that does not hear but
has a speech-to-text model (recording -> editable text in the box).

What the engine can do comes from ``engine.info()``: ``"focus"`` / ``"routing"`` False (a
remote backend) turn those panels into a plain "needs the in-process engine" note and the
Model panel shows the backend and base URL; ``"hears_audio"`` False with ``"can_transcribe"``
puts a recording's transcript in the text box for editing, and the turn then sends that text
(the recording stays in the history, not sent as audio).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import wave
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from ..config import ROOT, Settings
from ..events import Audio, BadRequest, Options
from ..engine.inputs import ImageTooLarge, clean_text, open_image
from . import render
from .export import write_trace_zip
from .session import Session, Turn, View, _sentence, stream_turn

log = logging.getLogger(__name__)

EXAMPLES_DIR = ROOT / "assets" / "examples"
AUDIO_SUFFIXES = {".wav", ".wave", ".mp3", ".ogg", ".oga", ".flac", ".webm", ".m4a", ".aac", ".opus"}

FOCUS_PLACEHOLDER = ("Caption focus. Send a question with an image (or pick an example on the left): "
                     "the image appears here with a heatmap of where the model looked for each word. "
                     "Click a word of the reply to see its focus; a recording shows its focus over time.")
WORDS_PLACEHOLDER = [("The reply appears here word by word once the model answers.", None)]
ROUTING_PLACEHOLDER = ("Expert routing appears here while the model answers: how many tokens each expert took "
                       "per layer (prefill, decode, by modality), balance figures, and the experts the selected "
                       "word used with their gate weights.")
NO_EARS = ("This model does not hear recordings, and no speech-to-text model is set up: type your question "
           "instead.")
EXPORT_HELP = ("**QA trace.** Download the whole conversation as a zip: `trace.json` with the prompts, reasoning, "
               "answers, settings, model id, speed, per-token focus maps and expert routing, plus the input images, "
               "the recording, and a heatmap PNG for every word of each reply.")

CSS = """
.gradio-container {max-width: 100% !important; padding-top: 6px !important;}
#title h2 {margin: 0;}
#title p {margin: 0; color: var(--body-text-color-subdued);}
.placeholder {color: var(--body-text-color-subdued); padding: 18px; border: 1px dashed var(--border-color-primary);
              border-radius: 8px; text-align: center; line-height: 1.5;}
.caption {padding: 4px 2px;}
.routing {overflow-x: auto; margin-bottom: 8px;}
.routing table {border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums;}
.routing table.heat {min-width: 60%;}
.routing caption {caption-side: top; text-align: left; font-size: 12px; padding: 4px 0;
                  color: var(--body-text-color-subdued);}
.routing th, .routing td {padding: 5px 10px; border: 1px solid var(--border-color-primary); text-align: center;}
.routing td.fig {color: var(--body-text-color-subdued);}
.routing td.chosen {outline: 3px solid #f97316; outline-offset: -3px; font-weight: 700;}
.routing td.chosen sup {font-weight: 400; margin-left: 2px;}
.routing td.bar {width: 240px; text-align: left; white-space: nowrap;}
.routing td.bar span {display: inline-block; height: 12px; vertical-align: middle;}
.routing .key {display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; border-radius: 2px;}
.routing .gate {display: inline-block; margin-right: 12px; white-space: nowrap;}
.routing .gate i {display: inline-block; height: 8px; background: #6366f1; margin: 0 4px; vertical-align: middle;}
#words {max-height: 340px; overflow-y: auto;}
"""

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="orange")


def hidden() -> dict:
    """A fresh update that hides a component and drops its value (Gradio consumes update dicts)."""
    return gr.update(visible=False, value=None)


class InputError(Exception):
    """Something the user sent cannot be used; the message says what to do."""


# ----------------------------------------------------------------------------- inputs


def _check_size(path: str, what: str, max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise InputError(f"Could not read {Path(path).name}: upload it again.") from e
    if size > max_bytes:
        raise InputError(f"The {what} {Path(path).name} is {size / 2**20:.1f} MiB; the limit is "
                         f"{max_bytes / 2**20:g} MiB: send a smaller one.")


def read_audio(path: str, max_seconds: float | None = None, max_bytes: int | None = None) -> Audio:
    """A recording file -> Audio. WAV is read directly (its length checked from the header before the
    samples are read); other formats need ffmpeg (via gradio)."""
    name = Path(path).name
    _check_size(path, "recording", max_bytes)
    try:
        if Path(path).suffix.lower() in (".wav", ".wave"):
            with wave.open(path, "rb") as w:
                width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
                frames = w.getnframes()
                if max_seconds is not None and rate > 0 and frames / rate > max_seconds:
                    raise InputError(f"The recording {name} is {frames / rate:.0f} s long; the limit is "
                                     f"{max_seconds:g} s: send a shorter clip.")
                raw = w.readframes(frames)
            dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
            samples = np.frombuffer(raw, dtype=dtype)
            if width == 1:
                samples = (samples.astype(np.int16) - 128) * 256
            return Audio(samples.reshape(-1, channels) if channels > 1 else samples, rate)
        from gradio.processing_utils import audio_from_file

        rate, samples = audio_from_file(path)
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
    _check_size(path, "image", max_bytes)
    try:
        return open_image(path, **({} if max_pixels is None else {"max_pixels": max_pixels}))
    except ImageTooLarge as e:
        raise InputError(f"{name}: {_sentence(str(e))}.") from e
    except (BadRequest, OSError) as e:
        raise InputError(f"Could not read {name} as an image: send PNG, JPEG, WebP, GIF or BMP.") from e


def _path(item: Any) -> str:
    return item.get("path") if isinstance(item, dict) else str(item)


def make_turn(text: str, files: list, recording: str | None, options: Options,
              settings: Settings | None = None) -> Turn:
    """What the user sent -> a new Turn (images and recording read within the settings' limits, nothing
    sent yet). Control characters are dropped from the text."""
    s = settings or Settings(model="")
    turn = Turn(text=clean_text(text).strip(), options=options)
    recordings = [recording] if recording else []
    image_paths = []
    for item in files or []:
        path = _path(item)
        (recordings if Path(path).suffix.lower() in AUDIO_SUFFIXES else image_paths).append(path)
    if len(image_paths) > s.limits.max_images_per_turn:
        raise InputError(f"{len(image_paths)} images in one turn; the limit is {s.limits.max_images_per_turn}: "
                         "send fewer images.")
    if len(recordings) > 1:
        raise InputError("Send one recording per turn (record or attach just one).")
    for path in image_paths:
        turn.images.append(read_image(path, s.limits.max_image_pixels, s.limits.max_upload_bytes))
        turn.image_paths.append(path)
    if recordings:
        turn.audio = read_audio(recordings[0], s.limits.max_audio_seconds, s.limits.max_upload_bytes)
        turn.audio_path = recordings[0]
    if not (turn.text or turn.images or turn.audio is not None):
        raise InputError("Type a question, attach an image, or record a question first.")
    return turn


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
        if Path(_path(item)).suffix.lower() in AUDIO_SUFFIXES:
            return _path(item)
    return None


def make_options(thinking: bool, temperature: float, top_p: float, max_new_tokens: float,
                 seed: float | None) -> Options:
    """The generation settings as engine Options; a value that is not a number is an InputError
    (the engine checks the ranges)."""
    try:
        seed_value = None if seed is None or float(seed) < 0 else int(seed)
        return Options(enable_thinking=bool(thinking), temperature=float(temperature), top_p=float(top_p),
                       max_new_tokens=int(max_new_tokens), seed=seed_value)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError("The generation settings hold a value that is not a number: reset them and "
                         "try again.") from e


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


def device_memory() -> dict[str, int]:
    """Memory in use now: per GPU (allocated by torch) or, without CUDA, the process RSS."""
    try:
        import torch

        if torch.cuda.is_available():
            return {f"cuda:{d}": int(torch.cuda.memory_allocated(d)) for d in range(torch.cuda.device_count())}
    except Exception:  # no torch or a broken CUDA set-up: fall back to the process
        log.debug("cuda memory query failed", exc_info=True)
    try:
        with open("/proc/self/statm") as f:
            return {"cpu (process RSS)": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    except OSError:
        import resource

        return {"cpu (peak RSS)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ----------------------------------------------------------------------------- the page


@dataclass
class Studio:
    """The page's components and handlers; ``build`` returns the Blocks."""

    engine: Any
    settings: Settings

    def build(self) -> gr.Blocks:
        self.info = self.engine.info()
        self.remote = render.is_remote(self.info)
        self.focus_ok = self.info.get("focus", True) is not False  # a local Engine has no "focus" key
        self.routing_ok = self.info.get("routing", True) is not False
        self.hears = self.info.get("hears_audio", True) is not False
        self.can_transcribe = bool(self.info.get("can_transcribe")) and callable(
            getattr(self.engine, "transcribe", None))
        self.transcribing = not self.hears and self.can_transcribe  # recordings become editable text
        self.examples = load_examples()
        self.export_dir = Path(tempfile.mkdtemp(prefix="autoglm-export-"))
        with gr.Blocks(title="AutoGLM Studio") as demo:
            self._layout()
            self._wire(demo)
        return demo

    # ------------------------------------------------------------------ layout (reads like the page)
    def _layout(self) -> None:
        limit = int(self.info.get("context_limit") or 8192)
        self.state = gr.State(Session())  # deep-copied for each browser session
        watch = ("watch its reasoning, where it looked, and which experts it used" if self.focus_ok
                 else "watch its reasoning")
        gr.Markdown(f"## AutoGLM Studio\n`{self.info.get('model_id', 'model')}` · ask about an image or a "
                    f"recording; {watch}.", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                self.chatbot = gr.Chatbot(
                    label="Chat", height="calc(100vh - 330px)", min_height=320, elem_id="chat",
                    placeholder="**Ask AutoGLM about a picture or a recording.** Attach or paste images, record a "
                                "question with the microphone, or start with an example:",
                    examples=[self.chat_example(ex) for ex in self.examples],
                    buttons=["copy"], feedback_options=None)
                self.prompt = gr.MultimodalTextbox(
                    placeholder="Type a question; attach or paste images (several per turn are fine)…",
                    file_types=["image", "audio"], file_count="multiple", sources=["upload"],
                    submit_btn=False, show_label=False, elem_id="prompt")
                with gr.Row(equal_height=True):
                    self.mic = gr.Audio(sources=["microphone", "upload"], type="filepath",
                                        label=self.mic_label(), scale=3, elem_id="mic")
                    with gr.Column(scale=2, min_width=200):
                        with gr.Row():
                            self.send_btn = gr.Button("Send", variant="primary", min_width=80, elem_id="send")
                            self.stop_btn = gr.Button("Stop", variant="stop", min_width=80, elem_id="stop")
                        with gr.Row():
                            self.regen_btn = gr.Button("Regenerate", min_width=80, elem_id="regenerate")
                            self.clear_btn = gr.Button("Clear", min_width=80, elem_id="clear")
                        self.transcribe_btn = gr.Button("Transcribe", min_width=80, visible=self.transcribing,
                                                        elem_id="transcribe")
                with gr.Accordion("Generation settings", open=False):
                    with gr.Row():
                        self.thinking = gr.Checkbox(value=True, label="Thinking (reasoning before the answer)",
                                                    elem_id="thinking")
                        self.seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1,
                                              elem_id="seed")
                    with gr.Row():
                        self.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                                     elem_id="temperature")
                        self.top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="top-p")
                        self.max_new_tokens = gr.Slider(1, min(limit, 4096), value=512, step=1,
                                                        label="Max new tokens", elem_id="max-tokens")
                self.example_set = gr.Dataset(
                    label="Examples: click one to run it", components=["textbox"],
                    samples=[[example_caption(ex)] for ex in self.examples],
                    type="index", samples_per_page=8, elem_id="examples")
            with gr.Column(scale=6, min_width=480):
                with gr.Tabs():
                    with gr.Tab("Focus", id="focus", elem_id="tab-focus"):
                        self._focus_tab()
                    with gr.Tab("Routing", id="routing", elem_id="tab-routing"):
                        self.load_view = gr.Radio(list(render.LOAD_VIEWS), value="total", label="Expert load",
                                                  info="all tokens, prompt (prefill) or generated (decode) "
                                                       "tokens, or by the modality of the token",
                                                  visible=self.routing_ok, elem_id="load-view")
                        self.routing_html = gr.HTML(self.routing_placeholder(), elem_id="routing")
                        with gr.Row(equal_height=False):
                            self.token_html = gr.HTML("", elem_id="token-routes")
                            self.split_html = gr.HTML("", elem_id="modality-split")
                    with gr.Tab("Model", id="model", elem_id="tab-model"):
                        self.model_md = gr.Markdown(self.model_panel(Session()), elem_id="model-panel")
                        self.refresh_btn = gr.Button("Refresh memory figures", size="sm", visible=not self.remote)
                    with gr.Tab("Export", id="export", elem_id="tab-export"):
                        gr.Markdown(EXPORT_HELP)
                        self.export_btn = gr.Button("Build QA trace (.zip)", variant="primary", elem_id="export")
                        self.export_file = gr.File(label="QA trace", visible=False, elem_id="export-file")
        # the clean /chat API endpoint takes plain inputs; it has no place on the page
        with gr.Column(visible=False):
            self.api_text = gr.Textbox(label="text")
            self.api_images = gr.File(label="images", file_count="multiple", file_types=["image"])
            self.api_audio = gr.Audio(label="audio", type="filepath")
            self.api_btn = gr.Button("chat")

    def _focus_tab(self) -> None:
        self.focus_caption = gr.HTML(self.focus_placeholder(), elem_id="focus-caption")
        shown = self.focus_ok  # without focus (remote backend) the controls have nothing to act on
        with gr.Row(equal_height=False, visible=shown or self.routing_ok):
            self.turn_pick = gr.Dropdown([("latest", -1)], value=-1, label="Turn", min_width=140, elem_id="turn-pick")
            self.image_pick = gr.Radio([], label="Image", visible=False, min_width=140, elem_id="image-pick")
            self.colormap = gr.Dropdown(list(render.COLORMAPS), value="inferno", label="Colour map", min_width=120,
                                        visible=shown)
            self.opacity = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="Opacity", min_width=140, visible=shown)
        with gr.Row(equal_height=False):
            self.focus_image = gr.Image(type="pil", format="png", label="Focus heatmap", visible=False,
                                        interactive=False, height="40vh", buttons=["download", "fullscreen"],
                                        scale=3, min_width=240, elem_id="focus-image")
            self.words = gr.HighlightedText(WORDS_PLACEHOLDER, label="Reply word by word: click a word",
                                            color_map=render.WORD_COLORS, show_legend=False,
                                            show_inline_category=False, interactive=False, scale=2, min_width=200,
                                            visible=shown, elem_id="words")
        self.audio_focus = gr.Image(type="pil", format="png", label="Focus over the recording", visible=False,
                                    interactive=False, height=190, buttons=["download"], elem_id="audio-focus")
        with gr.Accordion("Layers: aggregate the focus maps again", open=False, visible=shown):
            with gr.Row(equal_height=False):
                self.aggregation = gr.Radio(list(render.AGGREGATIONS), value="default", label="Aggregation",
                                            info="default = the model's own choice; mean / max use the range")
                self.layer_from = gr.Slider(0, 1, value=0, step=1, label="from layer")
                self.layer_to = gr.Slider(1, 2, value=2, step=1, label="to layer (exclusive)")

    # ------------------------------------------------------------------ wiring
    def _wire(self, demo: gr.Blocks) -> None:
        settings = [self.thinking, self.temperature, self.top_p, self.max_new_tokens, self.seed]
        page = self.page_outputs()
        send = dict(fn=self.send, inputs=[self.prompt, self.mic, *settings, self.state], outputs=page,
                    concurrency_limit=None)  # the engine queues fairly and reports positions
        self.send_btn.click(**send, api_name="send")
        self.prompt.submit(**send, api_visibility="private")
        self.stop_btn.click(self.stop, [self.state], None, api_name="stop", concurrency_limit=None)
        self.regen_btn.click(self.regenerate, [*settings, self.state], page, api_name="regenerate",
                             concurrency_limit=None)
        self.clear_btn.click(self.clear, [self.state], page + [self.export_file], api_name="clear")
        self.example_set.click(self.fill_example, [self.example_set], [self.prompt, self.mic],
                               api_visibility="private").then(**send, api_visibility="private")
        self.chatbot.example_select(self.pick_chat_example, None, [self.prompt, self.mic],
                                    api_visibility="private").then(**send, api_visibility="private")

        self.words.select(self.select_word, [self.state], self.panel_outputs(), api_visibility="private")
        view = [self.turn_pick, self.image_pick, self.colormap, self.opacity, self.aggregation,
                self.layer_from, self.layer_to, self.load_view]
        for control in view:
            control.input(self.change_view, [*view, self.state], self.panel_outputs(), api_visibility="private")

        if self.transcribing:  # a model that does not hear: recording -> editable text in the box
            transcribe = dict(fn=self.transcribe, inputs=[self.prompt, self.mic, self.state], outputs=[self.prompt])
            self.transcribe_btn.click(**transcribe, api_name="transcribe")
            self.mic.stop_recording(**transcribe, api_visibility="private")
            self.mic.upload(**transcribe, api_visibility="private")

        self.refresh_btn.click(self.model_panel, [self.state], [self.model_md], api_visibility="private")
        demo.load(self.model_panel, [self.state], [self.model_md], api_visibility="private")
        self.export_btn.click(self.export, [self.state], [self.export_file], api_name="export")
        self.api_btn.click(self.api_chat, [self.api_text, self.api_images, self.api_audio, *settings, self.state],
                           [self.chatbot], api_name="chat", concurrency_limit=None)

    def focus_outputs(self) -> list:
        return [self.focus_caption, self.image_pick, self.focus_image, self.words, self.audio_focus,
                self.layer_from, self.layer_to]

    def routing_outputs(self) -> list:
        return [self.routing_html, self.token_html, self.split_html]

    def panel_outputs(self) -> list:
        return self.focus_outputs() + self.routing_outputs()

    def page_outputs(self) -> list:
        return [self.chatbot, self.prompt, self.mic, self.turn_pick, *self.panel_outputs(), self.model_md]

    # ------------------------------------------------------------------ chat handlers
    def send(self, prompt: dict | None, recording: str | None, thinking: bool, temperature: float, top_p: float,
             max_new_tokens: float, seed: float | None, session: Session, request: gr.Request):
        """Send what is in the inputs as a new turn and stream the reply into the page."""
        prompt = prompt or {}
        turn = self._new_turn(session, lambda: self.speech(make_turn(
            prompt.get("text", ""), prompt.get("files", []), recording,
            make_options(thinking, temperature, top_p, max_new_tokens, seed), self.settings), session))
        if turn is None:
            yield {self.chatbot: gr.skip()}
            return
        yield from self._run(session, turn, request, clear_inputs=True)

    def regenerate(self, thinking: bool, temperature: float, top_p: float, max_new_tokens: float,
                   seed: float | None, session: Session, request: gr.Request):
        """Ask again: the last turn's inputs with the current settings replace the last reply."""
        def again() -> Turn:
            if not session.turns:
                raise InputError("Nothing to regenerate yet: send a message first.")
            last = session.turns.pop()
            return Turn(text=last.text, images=last.images, image_paths=last.image_paths, audio=last.audio,
                        audio_path=last.audio_path, transcribed=last.transcribed,
                        options=make_options(thinking, temperature, top_p, max_new_tokens, seed))

        turn = self._new_turn(session, again)
        if turn is None:
            yield {self.chatbot: gr.skip()}
            return
        yield from self._run(session, turn, request, clear_inputs=False)

    def _new_turn(self, session: Session, make: Callable[[], Turn]) -> Turn | None:
        """The new turn, or None (with a warning) when the session already has one in flight (a double
        click on Send) or the inputs cannot be used. A returned turn holds the session's claim: ``_run``
        releases it."""
        if not session.claim():
            gr.Warning("A reply is still streaming: wait for it or press Stop.")
            return None
        try:
            return make()
        except InputError as e:
            session.release()
            gr.Warning(str(e))
            return None
        except BaseException:
            session.release()
            raise

    def _run(self, session: Session, turn: Turn, request: gr.Request | None, clear_inputs: bool):
        try:
            session.start(turn)
            first = {self.chatbot: session.history(), self.turn_pick: self.turn_choices(session),
                     **self.panel_updates(session)}
            if clear_inputs:
                first.update({self.prompt: gr.update(value=None), self.mic: None})
            yield first
            with closing(stream_turn(self.engine, session, _session_id(request))) as stream:  # closing cancels
                try:
                    for full in stream:
                        update = {self.chatbot: session.history()}
                        if full:
                            update.update(self.panel_updates(session))
                        yield update
                except Exception as e:  # a bug in the page: say so plainly, keep the page usable
                    log.exception("streaming a turn failed")
                    turn.fail(f"The page failed to show this reply ({type(e).__name__}); try again.")
        finally:
            if turn.running:  # the page went away before the turn ended
                turn.finish_reason = "cancelled"
            session.release()
        if turn.error:
            gr.Warning(turn.error)
        yield {self.chatbot: session.history(), **self.panel_updates(session), self.model_md: self.model_panel(session)}

    def api_chat(self, text: str, images: list | None, audio: str | None, thinking: bool, temperature: float,
                 top_p: float, max_new_tokens: float, seed: float | None, session: Session, request: gr.Request):
        """The /chat endpoint: plain inputs in, the session's chat history (messages) out, streamed."""
        if not session.claim():
            raise gr.Error("A reply is still streaming in this session: wait for it or call /stop.")
        try:
            try:
                turn = self.speech(make_turn(text, images or [], audio,
                                             make_options(thinking, temperature, top_p, max_new_tokens, seed),
                                             self.settings))
            except InputError as e:
                raise gr.Error(str(e)) from e
            session.start(turn)
            yield session.history()
            with closing(stream_turn(self.engine, session, _session_id(request))) as stream:
                for _ in stream:
                    yield session.history()
        finally:
            if session.turns and session.turns[-1].running:
                session.turns[-1].finish_reason = "cancelled"
            session.release()
        yield session.history()

    def speech(self, turn: Turn, session: Session | None = None) -> Turn:
        """A recording for a model that does not hear: refused plainly when nothing can transcribe it; kept
        out of the request when its transcript is already in the (edited) text, else the engine transcribes."""
        if turn.audio is None or self.hears:
            return turn
        if not self.can_transcribe:
            raise InputError(NO_EARS)
        if session is not None and session.transcribed and turn.text \
                and session.transcribed == fingerprint(turn.audio_path):
            turn.transcribed = True
            session.transcribed = None
        return turn

    def transcribe(self, prompt: dict | None, recording: str | None, session: Session):
        """The recording's transcript into the text box (before what was typed), for editing before Send."""
        prompt = prompt or {}
        path = recording_of(prompt, recording)
        if path is None:
            gr.Warning("Record or attach a recording first, then press Transcribe.")
            return gr.skip()
        try:
            spoken = (self.engine.transcribe(read_audio(path)) or "").strip()
        except InputError as e:
            gr.Warning(str(e))
            return gr.skip()
        except BadRequest as e:
            gr.Warning(_sentence(str(e)))
            return gr.skip()
        except Exception as e:  # the speech model failed: the user can still type
            log.exception("transcription failed")
            gr.Warning(f"Could not transcribe the recording ({type(e).__name__}): type the question instead.")
            return gr.skip()
        if not spoken:
            gr.Warning("No speech was recognised in the recording: type the question instead.")
            return gr.skip()
        session.transcribed = fingerprint(path)
        typed = (prompt.get("text") or "").strip()
        text = typed if spoken in typed else f"{spoken} {typed}".strip()
        return {"text": text, "files": [_path(f) for f in prompt.get("files") or []]}

    def stop(self, session: Session) -> None:
        """Stop the running reply: the engine stops within one token."""
        if not session.cancel():
            gr.Info("Nothing is running.")

    def clear(self, session: Session) -> dict:
        session.clear()
        return {self.chatbot: [], self.prompt: gr.update(value=None), self.mic: None,
                self.turn_pick: self.turn_choices(session), **self.panel_updates(session),
                self.model_md: self.model_panel(session), self.export_file: gr.update(value=None, visible=False)}

    @staticmethod
    def chat_example(ex: dict) -> dict:
        """An example as the empty Chatbot shows it (a card with a thumbnail)."""
        card: dict = {"display_text": example_label(ex), "text": ex.get("text") or ""}
        if ex.get("image"):
            card["icon"] = ex["image"]
        return card

    def pick_chat_example(self, evt: gr.SelectData) -> tuple:
        return self.fill_example(evt.index if isinstance(evt.index, int) else 0)

    def fill_example(self, index: int) -> tuple:
        ex = self.examples[index]
        files = [ex["image"]] if ex.get("image") else []
        return {"text": ex.get("text") or "", "files": files}, ex.get("audio")

    # ------------------------------------------------------------------ panel handlers
    def select_word(self, session: Session, evt: gr.SelectData) -> dict:
        index = evt.index if isinstance(evt.index, int) else None
        turn = session.shown_turn()
        if turn is None or index is None or index >= len(turn.words()):
            return self.panel_updates(session)
        session.view.word = None if session.view.word == index else index
        return self.panel_updates(session)

    def change_view(self, turn_pick: int, image_pick: str | None, colormap: str, opacity: float, aggregation: str,
                    layer_from: float, layer_to: float, load_view: str, session: Session) -> dict:
        view = session.view
        turn = None if turn_pick is None or int(turn_pick) < 0 else int(turn_pick)
        if turn != view.turn:
            view.turn, view.word, view.image = turn, None, 0
        elif image_pick:
            view.image = max(0, int(str(image_pick).split()[-1]) - 1)
        view.colormap, view.opacity, view.aggregation, view.load_view = colormap, float(opacity), aggregation, load_view
        view.layers = (int(layer_from), max(int(layer_to), int(layer_from) + 1))
        return self.panel_updates(session)

    def mic_label(self) -> str:
        if self.hears:
            return "Spoken question (sent with the turn)"
        if self.can_transcribe:
            return "Spoken question (transcribed into the text box: edit it, then Send)"
        return "Recording (this model does not hear: type your question)"

    def focus_placeholder(self) -> str:
        if not self.focus_ok:
            return render.unavailable_html("Caption focus", self.info.get("reason"))
        return render.placeholder_html(FOCUS_PLACEHOLDER)

    def routing_placeholder(self) -> str:
        if not self.routing_ok:
            return render.unavailable_html("Expert routing", self.info.get("reason"))
        return render.placeholder_html(ROUTING_PLACEHOLDER)

    def model_panel(self, session: Session) -> str:
        stats = next((t.stats for t in reversed(session.turns) if t.stats is not None), None)
        return render.model_markdown(self.info, {} if self.remote else device_memory(), stats)

    def export(self, session: Session):
        if not session.turns:
            gr.Warning("Nothing to export yet: send a message first.")
            return gr.update(value=None, visible=False)
        if session.busy:
            gr.Warning("A reply is still streaming: the trace holds it as far as it got.")
        path = write_trace_zip(session, self.info, self.export_dir)
        return gr.update(value=str(path), visible=True)

    # ------------------------------------------------------------------ rendering the session
    def turn_choices(self, session: Session):
        choices = [("latest", -1)] + [(f"{n + 1}: {(t.text or 'spoken / image question')[:32]}", n)
                                      for n, t in enumerate(session.turns)]
        return gr.update(choices=choices, value=-1 if session.view.turn is None else session.view.turn)

    def panel_updates(self, session: Session) -> dict:
        return {**self.focus_updates(session), **self.routing_updates(session)}

    def focus_updates(self, session: Session) -> dict:
        turn, view = session.shown_turn(), session.view
        if not self.focus_ok:
            return {self.focus_caption: self.focus_placeholder(), self.image_pick: gr.update(visible=False),
                    self.focus_image: hidden(), self.words: gr.update(visible=False, value=[]),
                    self.audio_focus: hidden()}
        if turn is None:
            return {self.focus_caption: self.focus_placeholder(),
                    self.image_pick: gr.update(visible=False), self.focus_image: hidden(),
                    self.words: WORDS_PLACEHOLDER, self.audio_focus: hidden()}
        words = turn.words()
        indices, label = session.selection(turn)
        captions: list[str] = []
        out = {self.words: render.word_chips(words, view.word) if words else WORDS_PLACEHOLDER,
               **self._image_focus(turn, view, indices, captions), **self._audio_focus(turn, view, indices, captions)}
        out[self.focus_caption] = render.focus_caption_html(
            label, captions, has_media=bool(turn.images or turn.sends_audio), running=turn.running)
        n_layers = turn.num_focus_layers()
        if n_layers and n_layers != view.known_layers:  # first focus of this model: fit the layer sliders
            view.known_layers, view.layers = n_layers, (0, n_layers)
            out[self.layer_from] = gr.update(maximum=max(n_layers - 1, 1), value=0)
            out[self.layer_to] = gr.update(minimum=1, maximum=n_layers, value=n_layers)
        return out

    def _image_focus(self, turn: Turn, view: View, indices: list[int], captions: list[str]) -> dict:
        if not turn.images:
            return {self.image_pick: gr.update(visible=False), self.focus_image: hidden()}
        k = min(view.image, len(turn.images) - 1)
        heat = turn.focus_map(indices, "image", k, view.aggregation, view.layers)
        shown = turn.images[k]
        if heat is not None:
            shown = render.overlay_heatmap(shown, heat, view.colormap, view.opacity)
            captions.append(f"{float(np.sum(heat)):.0%} of the attention on image {k + 1}")
        choices = [f"image {n + 1}" for n in range(len(turn.images))]
        return {self.image_pick: gr.update(choices=choices, value=choices[k], visible=len(choices) > 1),
                self.focus_image: gr.update(value=shown, visible=True)}

    def _audio_focus(self, turn: Turn, view: View, indices: list[int], captions: list[str]) -> dict:
        if not turn.sends_audio:  # none, or transcribed into the text: the model never saw it
            return {self.audio_focus: hidden()}
        heat = turn.focus_map(indices, "audio", 0, view.aggregation, view.layers)
        if heat is not None:
            captions.append(f"{float(np.sum(heat)):.0%} on the recording")
        figure = render.audio_focus_image(turn.audio.samples, turn.audio.sample_rate, heat, view.colormap,
                                          view.opacity)
        return {self.audio_focus: gr.update(value=figure, visible=True)}

    def routing_updates(self, session: Session) -> dict:
        turn = session.shown_turn()
        if not self.routing_ok or turn is None or not turn.load:
            return {self.routing_html: self.routing_placeholder(), self.token_html: "",
                    self.split_html: ""}
        indices, label = session.selection(turn)
        routed = [i for i in indices if turn.tokens.get(i) and turn.tokens[i].routes]
        token = turn.tokens[routed[-1] if turn.running else routed[0]] if routed else None
        token_label = f"“{token.text.strip()}” (token {token.index})" if token else ""
        routes = token.routes if token else None
        heatmap = render.routing_heatmap_html(turn.load, session.view.load_view, routes, token_label)
        return {self.routing_html: heatmap,
                self.token_html: render.token_routes_html(routes or [], token_label),
                self.split_html: render.modality_split_html(turn.load)}


def _session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "ui"


# ----------------------------------------------------------------------------- entry points


def build_ui(engine, settings: Settings) -> gr.Blocks:
    """The page as Blocks (not yet mounted)."""
    return Studio(engine, settings).build()


def mount_ui(app, engine, settings: Settings):
    """Mount the page at "/" of the FastAPI ``app``; returns the app."""
    blocks = build_ui(engine, settings)
    blocks.queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, blocks, path="/", theme=THEME, css=CSS, allowed_paths=[str(EXAMPLES_DIR)],
                               footer_links=["api"], show_error=True, max_file_size=settings.limits.max_upload_bytes)
