"""The shipped demo model's greedy answers, pinned: text, image and recording turns, thinking on and off.

``tests/engine/data/golden_answers.json`` was written by ``python tests/engine/test_golden_answers.py`` from the
code before the restructure (issue 15); a refactor of loading, engine, probes or processor that
changes what the model says, or which experts it picked for its first token, fails here.
Regenerate only for a change that is meant to change answers (a new checkpoint), and say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("data") / "golden_answers.json"
EXAMPLES = ROOT / "assets" / "examples"

# (name, text, image file, recording file, thinking)
CASES = [
    ("text_identity_zh", "你是谁？", None, None, True),
    ("text_identity_en_no_thinking", "Who are you?", None, None, False),
    ("image_describe", "What is in the image?", "scene1.png", None, True),
    ("image_color_no_thinking", "What color is the triangle?", "scene3.png", None, False),
    ("image_two_triangles", "What color is the triangle?", "scene4.png", None, True),
    ("image_and_recording", "", "scene2.png", "q1.wav", True),
    ("recording_only", "", None, "q3.wav", True),
]


def run_cases(engine) -> dict:
    # imported here so that the module keeps working whichever layout the package has
    from autoglm_app.events import Answer, Audio, ChatRequest, Message, Options, Reasoning, Routing, Stats

    out = {}
    for name, text, image, recording, thinking in CASES:
        images = [Image.open(EXAMPLES / image).convert("RGB")] if image else []
        audios = []
        if recording:
            samples, rate = sf.read(EXAMPLES / recording, dtype="float32")
            audios = [Audio(samples, rate)]
        request = ChatRequest([Message("user", text, images, audios)],
                              Options(temperature=0.0, max_new_tokens=96, seed=0, enable_thinking=thinking))
        events = engine.run(request)
        routes = [e for e in events if isinstance(e, Routing)]
        stats = [e for e in events if isinstance(e, Stats)][0]
        out[name] = {
            "reasoning": "".join(e.text for e in events if isinstance(e, Reasoning)),
            "answer": "".join(e.text for e in events if isinstance(e, Answer)),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "first_token_experts": [r.experts for r in routes[0].layers] if routes else [],
        }
    return out


def demo_engine():
    from autoglm_app.config import Settings
    from autoglm_app.server import load_engine

    return load_engine(Settings(quantize="fp32"))


@pytest.fixture(scope="module")
def answers():
    engine = demo_engine()
    try:
        return run_cases(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_demo_model_greedy_answers_are_unchanged(answers, name):
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    assert answers[name] == expected


if __name__ == "__main__":
    engine = demo_engine()
    try:
        result = run_cases(engine)
    finally:
        engine.close()
    GOLDEN.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1, ensure_ascii=False))
