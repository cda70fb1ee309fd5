"""Speech to text for models that do not hear: a (tiny, random, steered) Whisper through transformers."""

from __future__ import annotations

import numpy as np
import pytest

from tests import tiny_families as tiny
from autoglm_app.events import Audio, BadRequest, ChatRequest, Message, Options


@pytest.fixture(scope="module")
def transcriber(tmp_path_factory):
    from autoglm_app.engine.asr import Transcriber

    path = tiny.build_whisper(tmp_path_factory.mktemp("whisper"))
    t = Transcriber(path, max_new_tokens=8)
    tok = t.processor.tokenizer
    words = tok.encode("hello world", add_special_tokens=False)
    state = tiny.script_logits(t.model, [*words, tok.convert_tokens_to_ids("<|endoftext|>")])
    t.script = state
    return t


def _recording():
    """One second of a 440 Hz tone, 44.1 kHz stereo int16, as a browser might send it."""
    x = (np.sin(np.arange(44100) / 44100 * 440 * 2 * np.pi) * 20000).astype(np.int16)
    return Audio(np.stack([x, x], axis=1), 44100)


def test_transcribe_turns_a_recording_into_the_decoded_text(transcriber):
    transcriber.script["step"] = 0
    assert transcriber.transcribe(_recording()) == "hello world"


def test_remote_engine_sends_the_transcript_instead_of_audio(transcriber):
    from autoglm_app.engine.remote import RemoteEngine

    sent = {}

    class Empty(list):
        def close(self):
            pass

    def create(**kw):
        sent.update(kw)
        return Empty()

    eng = RemoteEngine("http://127.0.0.1:9/v1", model="m", asr=transcriber)
    eng.client.chat.completions.create = create
    transcriber.script["step"] = 0
    try:
        eng.run(ChatRequest([Message("user", "answer this:", audios=[_recording()])], Options(max_new_tokens=4)))
    finally:
        eng.close()
    assert sent["messages"] == [{"role": "user", "content": "hello world answer this:"}]


def test_load_engine_exposes_transcribe_with_asr_model(transcriber, tmp_path, monkeypatch):
    from autoglm_app import server
    from autoglm_app.config import Settings

    seen = {}

    def build(name, limits):
        seen["max_seconds"] = limits.max_audio_seconds
        return transcriber

    monkeypatch.setattr("autoglm_app.engine.asr.Transcriber", build)
    engine = server.load_engine(Settings(model="small", asr_model="whisper-dir"))
    try:
        transcriber.script["step"] = 0
        assert engine.transcribe(_recording()) == "hello world"
    finally:
        engine.close()
    assert seen["max_seconds"] == 30.0


def test_a_recording_under_a_raised_audio_limit_is_transcribed_whole(transcriber, monkeypatch):
    """--max-audio-seconds 60 --asr-model ...: a 45 s recording passes validation and is transcribed (two
    Whisper windows), instead of failing on a cap of the transcriber's own."""
    from autoglm_app import server
    from autoglm_app.config import parse_settings

    monkeypatch.setattr("autoglm_app.engine.asr.Transcriber",
                        lambda name, limits: setattr(transcriber, "max_seconds", limits.max_audio_seconds) or transcriber)
    settings = parse_settings(["--model", "small", "--asr-model", "whisper-dir", "--max-audio-seconds", "60"])
    engine = server.load_engine(settings)
    try:
        assert transcriber.max_seconds == 60.0
        tone = (np.sin(np.arange(45 * 16000) / 16000 * 440 * 2 * np.pi) * 0.3).astype(np.float32)
        transcriber.script["step"] = 0
        assert engine.transcribe(Audio(tone, 16000)) == "hello world hello world"  # one text per 30 s window
        with pytest.raises(BadRequest, match="limit is 60 s"):
            engine.transcribe(Audio(np.zeros(61 * 16000, np.float32), 16000))
    finally:
        engine.close()
        transcriber.max_seconds = 30.0
