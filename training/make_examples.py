"""Write the Gradio demo examples into ``assets/examples/``.

Run ``python -m training.make_examples``.  Produces four ShapesWorld
scenes (224 px PNG, fixed seeds, with 1, 2 and 3 shapes), three spoken
questions (16 kHz mono 16-bit WAV, held-out espeak-ng voice, each < 4 s) and
``examples.json``, a list of entries::

    {"image": "scene1.png" | null, "audio": "q1.wav" | null, "text": "...",
     "answer": "...", "task": "...", "transcript": "..." }

``text`` is the typed prompt (empty when the question is spoken);
``transcript`` is the spoken question (null when there is no audio);
``answer`` is the ground-truth answer from :func:`shapesworld.make_qa`.
Everything is deterministic, so re-running gives identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import shapesworld as sw
from . import speech

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "examples"
MAX_AUDIO_S = 4.0


def _scene_with(n_shapes: int, start_seed: int, pred: Callable[[sw.Scene], bool] | None = None
                ) -> tuple[int, sw.Scene]:
    """First seed >= start_seed whose scene has ``n_shapes`` shapes (and satisfies ``pred``)."""
    for seed in range(start_seed, start_seed + 10_000):
        scene = sw.random_scene(random.Random(seed), size=224)
        if len(scene.shapes) == n_shapes and (pred is None or pred(scene)):
            return seed, scene
    raise RuntimeError("no matching scene found")


def _find_qa(scene: sw.Scene, task: str, pred: Callable[[sw.QA], bool]) -> sw.QA:
    """First QA (over rng seeds 0, 1, ...) for ``task`` that satisfies ``pred``."""
    for seed in range(10_000):
        qa = sw.make_qa(scene, random.Random(seed), task=task)
        if pred(qa):
            return qa
    raise RuntimeError(f"no matching {task} question found")


def _spoken(text: str, start_seed: int) -> np.ndarray:
    """Synthesize with a held-out voice; first seed whose audio is shorter than MAX_AUDIO_S."""
    for seed in range(start_seed, start_seed + 100):
        audio = speech.synthesize(text, random.Random(seed), speech.VOICES_HELDOUT)
        if audio.size / speech.SAMPLE_RATE < MAX_AUDIO_S:
            return audio
    raise RuntimeError("could not synthesize a short enough clip")


def build(out_dir: Path) -> list[dict]:
    """Generate all example files into ``out_dir``; return the JSON entries."""
    out_dir.mkdir(parents=True, exist_ok=True)
    distinct = lambda s: len({(x.color, x.kind) for x in s.shapes}) == len(s.shapes)  # noqa: E731
    _, s1 = _scene_with(3, 100, distinct)
    _, s2 = _scene_with(2, 200, distinct)
    _, s3 = _scene_with(1, 300, lambda s: s.shapes[0].color in ("red", "yellow"))
    # a scene with two shapes of the same kind, to show the ambiguous answer form
    _, s4 = _scene_with(3, 400, lambda s: len({x.kind for x in s.shapes}) == 2)
    scenes = {"scene1.png": s1, "scene2.png": s2, "scene3.png": s3, "scene4.png": s4}
    for name, scene in scenes.items():
        sw.render(scene).save(out_dir / name, optimize=True)

    unique = lambda qa: qa.target is not None  # noqa: E731
    qas = [
        ("scene1.png", None, sw.make_qa(s1, random.Random(0), task="describe")),
        ("scene2.png", "q1.wav", _find_qa(s2, "where", unique)),
        ("scene3.png", None, _find_qa(s3, "color", unique)),
        ("scene4.png", "q2.wav", _find_qa(s4, "count", lambda qa: qa.question.startswith("How many shapes"))),
        ("scene4.png", None, _find_qa(s4, "color", lambda qa: qa.answer.startswith("There are two"))),
        (None, "q3.wav", _find_qa(s1, "identity", lambda qa: qa.question == "Who are you?")),
        (None, None, _find_qa(s1, "identity", lambda qa: qa.question == "你是谁？")),
    ]
    entries = []
    for i, (image, audio, qa) in enumerate(qas):
        if audio is not None:
            speech.write_wav(out_dir / audio, _spoken(qa.question, 1000 + 10 * i))
        entries.append({
            "image": image,
            "audio": audio,
            "text": "" if audio else qa.question,
            "answer": qa.answer,
            "task": qa.task,
            "transcript": qa.question if audio else None,
        })
    (out_dir / "examples.json").write_text(
        json.dumps(entries, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    entries = build(args.out)
    total = 0
    for path in sorted(args.out.iterdir()):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.name:16s} {path.stat().st_size / 1024:7.1f} KiB")
    print(f"{len(entries)} entries, total {total / 1024:.1f} KiB in {args.out}")


if __name__ == "__main__":
    main()
