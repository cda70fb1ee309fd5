"""Behaviour tests for the ShapesWorld data generator and its speech synthesis."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from training import shapesworld as sw
from training import speech

N_SCENES = 150


def scenes(n: int = N_SCENES, size: int = 224, seed: int = 0) -> list[sw.Scene]:
    rng = random.Random(seed)
    return [sw.random_scene(rng, size=size) for _ in range(n)]


def scene_of(size: int, *shapes: tuple[str, str, str]) -> sw.Scene:
    """Hand-built scene: shapes given as (color, kind, cell), centred, 24% of side."""
    side = int(0.24 * size)
    out = []
    for color, kind, cell in sorted(shapes, key=lambda t: sw.CELLS.index(t[2])):
        x0, y0, x1, y1 = sw.cell_bounds(cell, size)
        bx = int((x0 + x1) / 2 - side / 2)
        by = int((y0 + y1) / 2 - side / 2)
        out.append(sw.Shape(kind, color, cell, (bx, by, bx + side, by + side)))
    return sw.Scene(size=size, shapes=tuple(out), seed=7)


# ------------------------------------------------------------------- scenes


def test_constants() -> None:
    assert sw.CELLS == ["top left", "top", "top right", "left", "center", "right",
                        "bottom left", "bottom", "bottom right"]
    assert sw.SHAPES == ("circle", "square", "triangle")
    assert sw.COLORS == ("red", "green", "blue", "yellow")
    assert sw.TASKS == ("describe", "color", "where", "count", "exists", "identity")


def test_same_seed_same_scene_and_pixels() -> None:
    a = sw.random_scene(random.Random(123))
    b = sw.random_scene(random.Random(123))
    assert a == b
    assert np.array_equal(np.asarray(sw.render(a)), np.asarray(sw.render(b)))
    c = sw.random_scene(random.Random(124))
    assert a != c


def test_render_format() -> None:
    for size in (128, 224, 256):
        img = sw.render(sw.random_scene(random.Random(size), size=size))
        assert img.mode == "RGB" and img.size == (size, size)
    with pytest.raises(ValueError):
        sw.random_scene(random.Random(0), size=64)


@pytest.mark.parametrize("size", [128, 224, 256])
def test_scene_geometry(size: int) -> None:
    counts = set()
    for scene in scenes(size=size, seed=size):
        n = len(scene.shapes)
        counts.add(n)
        assert 1 <= n <= 3
        cells = [s.cell for s in scene.shapes]
        assert len(set(cells)) == n, "shapes must be in distinct cells"
        assert cells == sorted(cells, key=sw.CELLS.index), "reading order"
        for s in scene.shapes:
            assert s.kind in sw.SHAPES and s.color in sw.COLORS
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            for side in (x1 - x0, y1 - y0):
                assert 0.18 * size <= side <= 0.30 * size
            cx0, cy0, cx1, cy1 = sw.cell_bounds(s.cell, size)
            cx, cy = s.center
            assert cx0 <= cx < cx1 and cy0 <= cy < cy1, "box centre inside its cell"
            # centred up to a small jitter
            assert abs(cx - (cx0 + cx1) / 2) <= 0.03 * size + 1
            assert abs(cy - (cy0 + cy1) / 2) <= 0.03 * size + 1
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1:]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
                assert not overlap
    assert counts == {1, 2, 3}


def _probe_point(s: sw.Shape) -> tuple[int, int]:
    """A point well inside the filled shape (triangle: its centroid, below the box centre)."""
    x0, y0, x1, y1 = s.box
    if s.kind == "triangle":  # apex top-centre, base along the bottom: centroid at 2/3 height
        return int((x0 + x1) / 2), int(y0 + 2 * (y1 - y0) / 3)
    return int((x0 + x1) / 2), int((y0 + y1) / 2)


def test_pixel_colour_matches_shape_colour() -> None:
    refs = {name: np.array(rgb, float) for name, rgb in sw.COLOR_RGB.items()}
    for scene in scenes(60, seed=5):
        px = np.asarray(sw.render(scene)).astype(float)
        for s in scene.shapes:
            x, y = _probe_point(s)
            patch = px[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(axis=0)
            nearest = min(refs, key=lambda c: np.linalg.norm(refs[c] - patch))
            assert nearest == s.color, (s, patch)
            assert np.abs(patch - refs[s.color]).max() <= 25
        # a background corner pixel is light and neutral-ish
        corner = px[:3, :3].reshape(-1, 3).mean(axis=0)
        if not any(s.box[0] < 4 and s.box[1] < 4 for s in scene.shapes):
            assert corner.min() > 190 and corner.max() - corner.min() < 30


def test_triangle_is_a_triangle() -> None:
    scene = scene_of(224, ("red", "triangle", "center"))
    px = np.asarray(sw.render(scene)).astype(int)
    x0, y0, x1, y1 = scene.shapes[0].box
    red = (px[..., 0] > 150) & (px[..., 1] < 100)
    # the top corners of the box are background, the bottom corners are filled
    assert not red[y0 + 2, x0 + 2] and not red[y0 + 2, x1 - 3]
    assert red[y1 - 2, x0 + 3] and red[y1 - 2, x1 - 4]
    area = red[y0:y1, x0:x1].mean()
    assert 0.4 < area < 0.6


# ---------------------------------------------------------------------- QA


def _count_word(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}[n]


def test_make_qa_deterministic_and_all_tasks_sampled() -> None:
    scene = sw.random_scene(random.Random(1))
    assert sw.make_qa(scene, random.Random(9)) == sw.make_qa(scene, random.Random(9))
    rng = random.Random(0)
    tasks = [sw.make_qa(scene, rng).task for _ in range(2000)]
    for t in sw.TASKS:
        assert tasks.count(t) / len(tasks) >= 0.07, t
    with pytest.raises(ValueError):
        sw.make_qa(scene, rng, task="nope")


def test_describe_answers_match_scene() -> None:
    rng = random.Random(3)
    for scene in scenes(seed=3):
        qa = sw.make_qa(scene, rng, task="describe")
        assert qa.target is None
        assert sw.caption_tuples(qa.answer) == sw.scene_tuples(scene)
        n = len(scene.shapes)
        head = "There is one shape: " if n == 1 else f"There are {_count_word(n)} shapes: "
        assert qa.answer.startswith(head) and qa.answer.endswith(".")
        assert qa.thinking.startswith("I see ")


def test_describe_reading_order_example() -> None:
    scene = scene_of(224, ("blue", "square", "center"), ("red", "circle", "top left"))
    qa = sw.make_qa(scene, random.Random(0), task="describe")
    assert qa.answer == ("There are two shapes: a red circle at the top left and "
                         "a blue square at the center.")


def test_caption_tuples_parsing() -> None:
    text = ("There are three shapes: a red circle at the top left, a Blue square at the "
            "top and a yellow triangle at the bottom right.")
    assert sw.caption_tuples(text) == {("red", "circle", "top left"),
                                       ("blue", "square", "top"),
                                       ("yellow", "triangle", "bottom right")}
    assert sw.caption_tuples("I do not know.") == set()


def test_count_answers_match_scene() -> None:
    rng = random.Random(4)
    for scene in scenes(seed=4):
        qa = sw.make_qa(scene, rng, task="count")
        m = re.fullmatch(r"How many (?:(red|green|blue|yellow) )?(shape|circle|square|triangle)s"
                         r" (?:are there|do you see)\?|Count the shapes\.", qa.question)
        assert m, qa.question
        color, kind = (m.group(1), m.group(2)) if m.group(2) else (None, "shape")
        n = sum(1 for s in scene.shapes
                if (color is None or s.color == color) and (kind == "shape" or s.kind == kind))
        noun = f"{color} {kind}" if color else kind
        if n == 0:
            expected = f"There are no {noun}s."
        elif n == 1:
            expected = f"There is one {noun}."
        else:
            expected = f"There are {_count_word(n)} {noun}s."
        assert qa.answer == expected


def _referents(scene: sw.Scene, question: str) -> list[sw.Shape]:
    """Shapes a where/color/exists question refers to, parsed from its text."""
    m = re.fullmatch(r"What color is the shape at the (.+)\?", question)
    if m:
        return [s for s in scene.shapes if s.cell == m.group(1)]
    m = re.fullmatch(r"(?:Where is the|What color is the|Is there a) "
                     r"(?:(red|green|blue|yellow) )?(shape|circle|square|triangle)\?", question)
    assert m, question
    color, kind = m.group(1), m.group(2)
    return [s for s in scene.shapes
            if (color is None or s.color == color) and (kind == "shape" or s.kind == kind)]


def test_where_color_exists_consistent_with_scene() -> None:
    rng = random.Random(5)
    seen: dict[str, set[str]] = {"where": set(), "color": set(), "exists": set()}
    for scene in scenes(300, seed=5):
        for task in ("where", "color", "exists"):
            qa = sw.make_qa(scene, rng, task=task)
            assert qa.thinking.startswith("I see ")
            hits = _referents(scene, qa.question)
            if len(hits) == 1:
                t = hits[0]
                assert qa.target == t
                if task == "where":
                    assert qa.answer == f"The {t.color} {t.kind} is at the {t.cell}."
                elif task == "color":
                    assert qa.answer.endswith(f" is {t.color}.")
                    assert t.color not in qa.question
                else:
                    assert qa.answer == f"Yes, there is a {t.color} {t.kind} at the {t.cell}."
                seen[task].add("unique")
            elif not hits:
                assert qa.target is None
                assert qa.answer.startswith("No, there is no " if task == "exists"
                                            else "There is no "), qa.answer
                seen[task].add("absent")
            else:
                assert qa.target is None
                prefix = "Yes, there are " if task == "exists" else "There are "
                assert qa.answer.startswith(prefix + _count_word(len(hits)) + " "), qa.answer
                if task != "color":
                    assert sw.caption_tuples(qa.answer) == {s.triple for s in hits}
                else:
                    assert all(f"{s.color}" in qa.answer for s in hits)
                seen[task].add("ambiguous")
    for task in seen:
        assert seen[task] == {"unique", "absent", "ambiguous"}, task


def test_exists_yes_no_balanced() -> None:
    rng = random.Random(6)
    answers = [sw.make_qa(s, rng, task="exists").answer for s in scenes(400, seed=6)]
    yes = sum(a.startswith("Yes") for a in answers) / len(answers)
    assert 0.4 <= yes <= 0.6


def test_ambiguous_references() -> None:
    scene = scene_of(224, ("red", "circle", "top left"), ("blue", "circle", "center"),
                     ("red", "square", "bottom"))
    rng = random.Random(0)
    color_qas = {qa.question: qa for qa in (sw.make_qa(scene, rng, task="color")
                                            for _ in range(200))}
    qa = color_qas["What color is the circle?"]
    assert qa.answer == "There are two circles: one is red and one is blue."
    assert qa.target is None
    assert color_qas["What color is the square?"].answer == "The square is red."
    assert color_qas["What color is the triangle?"].answer == "There is no triangle."
    assert color_qas["What color is the shape at the center?"].answer == \
        "The circle at the center is blue."

    where_qas = {qa.question: qa for qa in (sw.make_qa(scene, rng, task="where")
                                            for _ in range(300))}
    qa = where_qas["Where is the red shape?"]
    assert qa.answer == ("There are two red shapes: a red circle at the top left and "
                         "a red square at the bottom.")
    assert qa.target is None
    qa = where_qas["Where is the blue circle?"]
    assert qa.answer == "The blue circle is at the center."
    assert qa.target == scene.shapes[1]
    assert where_qas["Where is the green triangle?"].answer == "There is no green triangle."

    same = scene_of(224, ("green", "triangle", "left"), ("green", "triangle", "right"))
    qa = sw.make_qa(same, random.Random(0), task="where")
    assert qa.answer.startswith("There are two ")


def test_identity() -> None:
    scene = sw.random_scene(random.Random(0))
    rng = random.Random(0)
    qas = [sw.make_qa(scene, rng, task="identity") for _ in range(100)]
    en = [q for q in qas if q.lang == "en"]
    zh = [q for q in qas if q.lang == "zh"]
    assert en and zh
    for q in en:
        assert q.answer == ("I am AutoGLM-Phone-Tiny, a small multimodal model. "
                            "I can see images and hear speech.")
        assert q.thinking == "The user asks who I am."
    for q in zh:
        assert q.answer == "我是AutoGLM-Phone-Tiny，一个小型多模态模型。"
    assert all(q.target is None for q in qas)


# ------------------------------------------------------------------- speech


def test_voice_lists_disjoint() -> None:
    assert speech.VOICES_TRAIN and speech.VOICES_HELDOUT
    assert not set(speech.VOICES_TRAIN) & set(speech.VOICES_HELDOUT)
    # the wider training set adds voices, none of them held out: no held-out-only accent
    # (scotland, nyc) and no held-out variant (f4, klatt)
    wide = speech.VOICES_TRAIN_WIDE
    assert set(speech.VOICES_TRAIN) < set(wide) and len(set(wide)) == len(wide)
    heldout_variants = {v.split("+")[1] for v in speech.VOICES_HELDOUT if "+" in v}
    heldout_accents = {v.split("+")[0] for v in speech.VOICES_HELDOUT} - {v.split("+")[0] for v in wide}
    assert heldout_variants == {"f4", "klatt"} and heldout_accents == {"en-gb-scotland", "en-us-nyc"}
    for v in wide:
        accent, _, variant = v.partition("+")
        assert accent not in heldout_accents and variant not in heldout_variants, v


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed")
def test_every_wide_training_voice_speaks() -> None:
    for v in speech.VOICES_TRAIN_WIDE:
        a = speech.synthesize("Is there a red circle?", random.Random(1), [v])
        assert 0.3 <= a.size / 16000 <= 6.0 and np.abs(a).max() > 0.1, v


def test_wav_roundtrip(tmp_path) -> None:
    audio = (0.5 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    path = tmp_path / "x.wav"
    speech.write_wav(path, audio)
    back, rate = speech.read_wav(path)
    assert rate == 16000 and back.dtype == np.float32 and back.shape == audio.shape
    assert np.abs(back - audio).max() < 1e-3


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed")
def test_synthesize() -> None:
    text = "Where is the red circle?"
    a = speech.synthesize(text, random.Random(42), speech.VOICES_TRAIN)
    b = speech.synthesize(text, random.Random(42), speech.VOICES_TRAIN)
    assert a.dtype == np.float32 and a.ndim == 1
    assert 0.3 <= a.size / 16000 <= 6.0
    assert np.abs(a).max() <= 1.0 and np.abs(a).max() > 0.1
    assert np.array_equal(a, b)
    rng = random.Random(42)  # speak() with synthesize()'s voice draw makes the same recording
    assert np.array_equal(a, speech.speak(text, rng, rng.choice(speech.VOICES_TRAIN)))
    c = speech.synthesize(text, random.Random(43), speech.VOICES_HELDOUT)
    assert c.dtype == np.float32 and 0.3 <= c.size / 16000 <= 6.0
    assert not (a.shape == c.shape and np.array_equal(a, c))


def test_speech_perturbation_is_deterministic_bounded_and_keeps_the_level() -> None:
    t = np.arange(16000) / 16000
    audio = (0.6 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    a = speech.perturb(audio, random.Random(5))
    assert np.array_equal(a, speech.perturb(audio, random.Random(5)))
    lengths = {speech.perturb(audio, random.Random(s)).size for s in range(20)}
    assert len(lengths) > 10  # the speed factor varies
    assert all(16000 / 1.12 - 2 <= n <= 16000 / 0.88 + 2 for n in lengths)
    assert a.dtype == np.float32 and abs(float(np.abs(a).max()) - 0.6) < 1e-3
    # with no speed change and no tilt it is the identity
    same = speech.perturb(audio, random.Random(5), speed=0.0, tilt=0.0)
    assert np.allclose(same, audio, atol=1e-6)


def test_speed_perturbation_moves_pitch_and_length_by_the_drawn_factor() -> None:
    """The resampler keeps a tone a tone: factor f shortens by f and raises the pitch by f."""
    t = np.arange(48000) / 16000
    audio = (0.6 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for seed in (5, 6, 7):
        factor = random.Random(seed).uniform(0.88, 1.12)  # perturb's first draw
        y = speech.perturb(audio, random.Random(seed), tilt=0.0)
        assert abs(y.size * factor / audio.size - 1) < 1e-3  # the factor, to its rational approximation
        peak_hz = np.fft.rfftfreq(y.size, 1 / 16000)[np.abs(np.fft.rfft(y)).argmax()]
        assert abs(peak_hz - 220 * factor) < 1.0, (seed, factor, peak_hz)


def test_speech_equaliser_changes_the_spectrum_within_its_range() -> None:
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # flat spectrum
    y = speech.perturb(audio, random.Random(3), speed=0.0, tilt=0.0, eq_db=6.0)
    assert y.shape == audio.shape and np.array_equal(y, speech.perturb(audio, random.Random(3), 0.0, 0.0, 6.0))
    f = np.fft.rfftfreq(audio.size, 1 / 16000)

    def band_db(x, lo, hi):
        p = np.abs(np.fft.rfft(x)) ** 2
        sel = (f >= lo) & (f < hi)
        return 10 * np.log10(p[sel].mean())

    # per band the gain relative to the input stays inside +-6 dB (plus the level restoring)
    diffs = [band_db(y, lo, hi) - band_db(audio, lo, hi) for lo, hi in ((300, 500), (900, 1100), (5000, 7000))]
    assert max(diffs) - min(diffs) > 1.0  # the colour changed
    assert max(diffs) - min(diffs) < 12.5


def test_feature_masking_is_deterministic_bounded_and_fills_with_the_mean() -> None:
    import torch

    from training.data import mask_features

    x = torch.randn(80, 200)
    before = x.clone()
    y = mask_features(x, random.Random(9))
    assert torch.equal(y, mask_features(x, random.Random(9))) and torch.equal(x, before)
    changed = y != x
    rows, cols = changed.all(1), changed.all(0)  # masked bands span every frame, masked spans every bin
    assert torch.equal(changed, rows[:, None] | cols[None, :])
    assert int(rows.sum()) <= 2 * 10 and int(cols.sum()) <= 2 * 8
    assert torch.allclose(y[changed], torch.full_like(y[changed], float(x.mean())))
    masked = [int((mask_features(x, random.Random(s)) != x).all(1).sum()) for s in range(20)]
    assert len(set(masked)) > 5  # widths vary
    assert torch.equal(mask_features(x, random.Random(1), 0, 10, 0, 8), x)  # no masks: unchanged
