"""The page on engines that cannot do everything AutoGLM can.

- a remote backend (RemoteEngine against a stand-in OpenAI server on loopback: the app's own /v1 on the
  small random model): chat streams, the Focus and Routing panels say they need the in-process engine,
  the Model panel shows the backend and base URL;
- a model that does not hear, with a speech-to-text function: the recording's transcript goes into the
  text box, and the turn sends the edited text (the recording stays in the history, not sent as audio);
- a model that does not hear and cannot transcribe: sending a recording says to type the question.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from autoglm_app.config import Settings
from autoglm_app.ui.handlers import NO_EARS, Handlers
from autoglm_app.ui.inputs import read_audio
from autoglm_app.ui.layout import build_page, mount_ui
from autoglm_app.ui.session import Session, Turn, stream_turn
from tests.ui_helpers import page_regenerate, page_send

SPOKEN = "where is the red circle"
NEEDS_ENGINE = "needs the in-process engine"


def write_wav(path, seconds: float = 0.5, rate: int = 16000) -> str:
    x = (np.sin(np.arange(int(seconds * rate)) / rate * 440 * 2 * np.pi) * 12000).astype("<i2")
    sf.write(str(path), x, rate, format="WAV", subtype="PCM_16")
    return str(path)


def send(studio: Handlers, session: Session, text: str = "", files=(), recording: str | None = None) -> list[dict]:
    """Drive the page's Send handler as Gradio would (thinking off, greedy, 6 new tokens)."""
    return list(page_send(studio, session, text, files, recording))


def build(engine) -> Handlers:
    """The page's handlers (``.page`` the components they update, ``.blocks`` the page)."""
    blocks, studio = build_page(engine, Settings(model="small"))
    studio.blocks = blocks
    return studio


def component(studio: Handlers, elem_id: str):
    return next(b for b in studio.blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


# ----------------------------------------------------------------------------- remote backend


@pytest.fixture(scope="module")
def remote(engine):
    from autoglm_app.engine.remote import RemoteEngine
    from autoglm_app.server import create_app, serve_in_thread

    upstream = serve_in_thread(create_app(engine, Settings(model="small", served_model_names=["upstream"]), ui=False))
    eng = RemoteEngine(upstream.url + "/v1")
    yield eng
    eng.close()
    upstream.stop()


def test_remote_backend_streams_a_turn_and_the_panels_say_they_need_the_in_process_engine(remote, tmp_path):
    studio = build(remote)
    assert not studio.caps.focus and not studio.caps.routing and studio.caps.remote
    session = Session()
    empty = studio.panels.all(session)  # before any turn: the note, not "ask a question"
    assert NEEDS_ENGINE in empty[studio.page.focus_caption] and NEEDS_ENGINE in empty[studio.page.routing_html]
    assert "in-process engine (the model" in empty[studio.page.focus_caption]  # the engine's own reason is shown

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    updates = send(studio, session, "what shape is this?", [str(image)])
    turn = session.turns[-1]
    assert turn.ok, turn.error
    assert (turn.answer + turn.reasoning).strip()  # text streamed, no probe events: only the server's logprobs
    assert turn.tokens and all(not t.images and not t.routes and t.logprob is not None and t.token_id == -1
                               for t in turn.tokens.values())
    assert len(updates) >= 3  # first (inputs cleared), streamed chunk(s), final
    history = updates[-1][studio.page.chatbot]
    assert history[0] == {"role": "user", "content": "what shape is this?"}
    assert history[-1]["role"] == "assistant" and history[-1]["content"].strip()
    final = updates[-1]
    assert NEEDS_ENGINE in final[studio.page.focus_caption] and NEEDS_ENGINE in final[studio.page.routing_html]
    assert final[studio.page.focus_image]["visible"] is False
    assert final[studio.page.words]["visible"] is True  # the reply's words, for their probabilities and alternatives
    session.view.word = 0
    legend, table, pick, button = studio.page.alts
    shown = studio.panels.all(session)
    assert "Alternatives for" in shown[table] and "entropy not sent" in shown[table]
    assert shown[pick]["visible"] is False and shown[button]["visible"] is False  # no token ids: no branch
    assert final[studio.page.token_html] == "" and final[studio.page.split_html]["visible"] is False

    panel = final[studio.page.model_md]
    assert "openai" in panel and remote.base_url in panel and "Last answer" in panel
    assert "#### Devices" not in panel and "#### Modules" not in panel and "memory in use" not in panel


def test_local_engine_panels_keep_their_usual_placeholders(engine):
    studio = build(engine)  # Engine.info() has no "focus" key: treated as available
    assert studio.caps.focus and studio.caps.routing and studio.caps.hears and not studio.caps.remote
    empty = studio.panels.all(Session())
    assert NEEDS_ENGINE not in empty[studio.page.focus_caption] and "Caption focus" in empty[studio.page.focus_caption]
    assert "#### Devices" in studio.model(Session())
    assert re.search(r"\| cpu \(process RSS\) \| [^|]+ \| \d+\.\d [MG]iB \|", studio.model(Session()))  # psutil


# ----------------------------------------------------------------------------- a model that does not hear


@pytest.fixture
def deaf_engine(engine, monkeypatch):
    """The small engine as a model without an audio tower but with a (stand-in) Whisper."""
    calls = []

    def transcribe(audio):
        calls.append(audio)
        return SPOKEN

    monkeypatch.setattr(engine.family, "hears_audio", False)  # restored after the test
    monkeypatch.setattr(engine, "transcribe", transcribe)
    engine.transcribe_calls = calls
    yield engine
    del engine.transcribe_calls


def spy_submit(engine, monkeypatch) -> list:
    requests = []
    real = engine.submit

    def submit(request):
        requests.append(request)
        return real(request)

    monkeypatch.setattr(engine, "submit", submit)
    return requests


def test_transcript_fills_the_text_box_and_the_edited_text_is_sent_without_the_audio(deaf_engine, monkeypatch,
                                                                                   tmp_path):
    studio = build(deaf_engine)
    assert studio.caps.transcribing and "transcribed" in component(studio, "mic").label
    assert component(studio, "transcribe").visible is True
    assert "transcribed to text" in studio.model(Session())
    wav = write_wav(tmp_path / "question.wav")
    session = Session()

    filled = studio.transcribe({"text": "", "files": []}, wav, session)
    assert filled == {"text": SPOKEN, "files": []} and len(deaf_engine.transcribe_calls) == 1
    again = studio.transcribe(filled, wav, session)  # pressing it twice does not repeat the text
    assert again["text"] == SPOKEN

    requests = spy_submit(deaf_engine, monkeypatch)
    edited = SPOKEN + " in the picture?"
    send(studio, session, edited, recording=wav)
    turn = session.turns[-1]
    assert turn.ok, turn.error
    sent = requests[-1].messages[-1]
    assert sent.text == edited and sent.audios == []  # the edited transcript, not the recording
    assert len(deaf_engine.transcribe_calls) == 2  # the engine did not transcribe again
    history = session.history()
    assert history[0] == {"role": "user", "content": edited}
    assert history[1] == {"role": "user", "content": {"path": wav}}  # the recording stays playable
    assert studio.panels.all(session)[studio.page.audio_focus]["visible"] is False

    # regenerate keeps it that way
    list(page_regenerate(studio, session, max_new_tokens=4))
    assert requests[-1].messages[-1].text == edited and requests[-1].messages[-1].audios == []


def test_recording_attached_to_the_box_is_transcribed_too(deaf_engine, tmp_path):
    studio = build(deaf_engine)
    wav = write_wav(tmp_path / "attached.wav")
    filled = studio.transcribe({"text": "briefly:", "files": [wav]}, None, Session())
    assert filled == {"text": f"{SPOKEN} briefly:", "files": [wav]}


def test_sending_without_transcribing_lets_the_engine_transcribe(deaf_engine, monkeypatch, tmp_path):
    studio = build(deaf_engine)
    requests = spy_submit(deaf_engine, monkeypatch)
    session = Session()
    send(studio, session, recording=write_wav(tmp_path / "q.wav"))
    assert session.turns[-1].ok, session.turns[-1].error
    assert len(requests[-1].messages[-1].audios) == 1 and len(deaf_engine.transcribe_calls) == 1


def test_transcribe_via_gradio_client(deaf_engine, tmp_path):
    """The wired /transcribe endpoint returns the box's new value through Gradio's own (de)serialisation."""
    from fastapi import FastAPI
    from gradio_client import Client, handle_file

    from autoglm_app.server import serve_in_thread

    server = serve_in_thread(mount_ui(FastAPI(), deaf_engine, Settings(model="small")))
    try:
        client = Client(server.url, verbose=False)
        try:
            value = client.predict({"text": "", "files": []}, handle_file(write_wav(tmp_path / "c.wav")),
                                   api_name="/transcribe")
        finally:
            client.close()  # its heartbeat stream would hold the server's shutdown
    finally:
        server.stop()
    assert value["text"] == SPOKEN and value["files"] == []


def test_model_that_neither_hears_nor_transcribes_asks_for_typed_text(engine, monkeypatch, tmp_path):
    monkeypatch.setattr(engine.family, "hears_audio", False)
    assert engine.transcribe is None
    studio = build(engine)
    assert not studio.caps.transcribing and component(studio, "transcribe").visible is False
    assert "type your question" in component(studio, "mic").label
    wav = write_wav(tmp_path / "q.wav")
    session = Session()
    with pytest.warns(UserWarning, match="type your question"):
        updates = send(studio, session, recording=wav)
    assert session.turns == [] and len(updates) == 1  # nothing sent; the inputs are kept for typing

    import gradio as gr

    with pytest.raises(gr.Error, match="type your question"):
        list(studio.api_chat("", None, wav, False, 0.0, 1.0, 4, 1, Session(), None))

    # a recording that reaches the engine anyway (another client) is refused in plain words
    session.start(Turn(text="", audio=read_audio(wav), audio_path=wav))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(stream_turn(engine, session, "s"))
    error = session.turns[-1].error
    assert error.startswith("This model does not hear audio") and "transcript as text" in error
    assert session.turns[-1].chat_messages()[-1]["content"].startswith("**Error:** This model does not hear")
    assert NO_EARS.endswith("type your question instead.")
