"""The page's named API driven by gradio_client against live servers on 127.0.0.1.

The real engine (the random small model) serves text, image and audio turns and two
clients at once; a scripted engine, whose events we choose, proves the thinking
message, Stop and the busy message, which the random model cannot be made to show.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autoglm_app.events import Queued
from tests.ui_helpers import THINKING_SCRIPT, ScriptedEngine, serve_ui

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
SETTINGS = dict(thinking=True, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=0)


def chat(client: Client, text: str = "", images: list[str] = (), audio: str | None = None, **settings):
    s = {**SETTINGS, **settings}
    return client.predict(text, [handle_file(p) for p in images], handle_file(audio) if audio else None,
                          s["thinking"], s["temperature"], s["top_p"], s["max_new_tokens"], s["seed"],
                          api_name="/chat")


def text_of(message: dict) -> str:
    parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def files_of(message: dict) -> list[str]:
    parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
    return [p["file"] if isinstance(p["file"], str) else p["file"]["path"]
            for p in parts if isinstance(p, dict) and p.get("type") == "file"]


def thinking(history: list[dict]) -> list[dict]:
    return [m for m in history if (m.get("metadata") or {}).get("title") == "Thinking"]


def user_texts(history: list[dict]) -> list[str]:
    return [text_of(m) for m in history if m["role"] == "user" and text_of(m)]


def assert_answered(history: list[dict]) -> None:
    last = history[-1]
    assert last["role"] == "assistant" and not last.get("metadata")
    assert text_of(last).strip() and "Traceback" not in text_of(last)
    for m in thinking(history):  # whenever the model reasoned, the thinking message is finished
        assert m["metadata"]["status"] == "done" and m["metadata"]["duration"] > 0  # seconds it took, rounded to 0.01


# ----------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def client(live_server) -> Client:
    return Client(live_server, verbose=False)


def test_text_turn_returns_an_answer(client):
    history = chat(client, "Who are you?")
    assert user_texts(history) == ["Who are you?"]
    assert_answered(history)


def test_image_turn_with_two_images_shows_both_and_returns_an_answer(live_server):
    history = chat(Client(live_server, verbose=False), "What is in the images?",
                   images=[EXAMPLES / "scene1.png", EXAMPLES / "scene2.png"])
    assert len([f for m in history if m["role"] == "user" for f in files_of(m) if f.endswith(".png")]) == 2
    assert_answered(history)


def test_audio_turn_keeps_the_recording_playable_and_returns_an_answer(live_server):
    history = chat(Client(live_server, verbose=False), audio=EXAMPLES / "q1.wav")
    recordings = [f for m in history if m["role"] == "user" for f in files_of(m) if f.endswith(".wav")]
    assert len(recordings) == 1
    assert_answered(history)


def test_two_clients_at_once_keep_separate_histories(live_server):
    a, b = Client(live_server, verbose=False), Client(live_server, verbose=False)
    s = [*SETTINGS.values()]
    job_a = a.submit("alpha question", [], None, *s, api_name="/chat")
    job_b = b.submit("beta question", [], None, *s, api_name="/chat")
    assert user_texts(job_a.result(timeout=60)) == ["alpha question"]
    assert user_texts(job_b.result(timeout=60)) == ["beta question"]
    assert user_texts(chat(a, "alpha again")) == ["alpha question", "alpha again"]
    assert user_texts(chat(b, "beta again")) == ["beta question", "beta again"]


def test_empty_turn_is_refused_with_a_readable_message(client):
    with pytest.raises(Exception, match="Type a question"):
        chat(client, "   ")


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine()
    server = serve_ui(engine)
    yield engine, server.url
    server.stop()


@pytest.fixture
def scripted_engine(scripted):
    engine, url = scripted
    engine.script, engine.endless, engine.delay, engine.busy = THINKING_SCRIPT, False, 0.05, False
    return engine, url


def test_reasoning_streams_as_a_pending_thinking_message_then_done_with_duration(scripted_engine):
    _, url = scripted_engine
    job = Client(url, verbose=False).submit("Describe it", [], None, *SETTINGS.values(), api_name="/chat")
    final = job.result(timeout=30)
    steps = [thinking(h) for h in job.outputs() if thinking(h)]
    assert steps and steps[0][0]["metadata"]["status"] == "pending"
    [message] = thinking(final)
    assert message["metadata"]["status"] == "done" and message["metadata"]["duration"] == pytest.approx(0.2)
    assert text_of(message) == "Let me look. Three shapes."
    assert final[-1]["role"] == "assistant" and text_of(final[-1]) == "There are three shapes."
    assert final.index(message) == len(final) - 2  # thinking comes right before the answer


def test_stop_ends_generation(scripted_engine):
    engine, url = scripted_engine
    engine.script, engine.endless = [Queued(0)], True
    client = Client(url, verbose=False)
    job = client.submit("Talk forever", [], None, *SETTINGS.values(), api_name="/chat")
    deadline = time.time() + 15
    while time.time() < deadline and not any("word3" in text_of(h[-1]) for h in job.outputs() if h):
        time.sleep(0.05)
    client.predict(api_name="/stop")
    final = job.result(timeout=15)
    assert engine.handles[-1].cancelled
    assert text_of(final[-1]).endswith("*(stopped)*")
    assert "word2999" not in text_of(final[-1])


def test_busy_engine_becomes_a_readable_message_in_the_chat(scripted_engine):
    engine, url = scripted_engine
    engine.busy = True
    history = chat(Client(url, verbose=False), "Anyone there?")
    last = text_of(history[-1])
    assert last.startswith("**Error:** The server is busy") and "try again in about 2 s" in last


def test_export_returns_a_trace_zip(scripted_engine):
    import json
    import zipfile

    _, url = scripted_engine
    client = Client(url, verbose=False)
    chat(client, "Describe it")
    path = client.predict(api_name="/export")
    with zipfile.ZipFile(path if isinstance(path, str) else path["value"]) as zf:
        trace = json.loads(zf.read("trace.json"))
    assert trace["model"]["model_id"] == "scripted"
    assert trace["turns"][0]["reasoning"] == "Let me look. Three shapes."
    assert [t["routing"][0]["experts"] for t in trace["turns"][0]["tokens"]] == [[0]] * 4


def test_regenerate_replaces_the_last_reply_and_clear_empties_the_history(scripted_engine):
    engine, url = scripted_engine
    client = Client(url, verbose=False)
    chat(client, "Describe it")
    sent = len(engine.handles)
    history = client.predict(*SETTINGS.values(), api_name="/regenerate")[0]
    assert len(engine.handles) == sent + 1
    assert user_texts(history) == ["Describe it"] and text_of(history[-1]) == "There are three shapes."
    assert client.predict(api_name="/clear")[0] == []
    assert user_texts(chat(client, "Fresh start")) == ["Fresh start"]
