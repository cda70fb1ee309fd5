"""ShapesWorld: a tiny, deterministic synthetic world of coloured shapes.

A scene is a square RGB canvas with 1-3 filled shapes (circle, square,
triangle) in four colours (red, green, blue, yellow), each centred (up to a
small jitter) in a distinct cell of a 3x3 grid.  :func:`make_qa` turns a scene
into a templated question / thinking / answer triple for one of six tasks.
The vocabulary is deliberately small and regular so that a tiny model can
learn it; every task has a single canonical answer form.

Only the standard library, numpy and PIL are used.  Everything is
deterministic: ``random_scene`` and ``make_qa`` draw only from the
``random.Random`` they are given, and ``render`` derives its colour jitter and
background texture from ``scene.seed``.

Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive, so the
box width is ``x1 - x0``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CELLS",
    "SHAPES",
    "COLORS",
    "TASKS",
    "TASK_WEIGHTS",
    "COLOR_RGB",
    "IDENTITY_ANSWER_EN",
    "IDENTITY_ANSWER_ZH",
    "Shape",
    "Scene",
    "QA",
    "random_scene",
    "render",
    "make_qa",
    "caption_tuples",
    "scene_tuples",
    "cell_bounds",
]

CELLS: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
TASKS: tuple[str, ...] = ("describe", "color", "where", "count", "exists", "identity")
#: Sampling weights for :func:`make_qa` when no task is forced (same order as TASKS).
TASK_WEIGHTS: tuple[float, ...] = (0.20, 0.18, 0.20, 0.14, 0.18, 0.10)

#: Nominal fill colour of each colour name; ``render`` adds a small per-shape jitter.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (235, 200, 35),
}

MIN_SIZE, MAX_SIZE = 128, 256
SHAPE_FRAC = (0.18, 0.30)  # shape box side as a fraction of the canvas side
JITTER_FRAC = 0.03  # max centre jitter as a fraction of the canvas side
COLOR_JITTER = 18  # max per-channel deviation from COLOR_RGB

IDENTITY_ANSWER_EN = (
    "I am AutoGLM-Phone-Tiny, a small multimodal model. I can see images and hear speech."
)
IDENTITY_ANSWER_ZH = "我是AutoGLM-Phone-Tiny，一个小型多模态模型。"
_IDENTITY_Q_EN = ("Who are you?", "What is your name?", "What are you?", "Introduce yourself.")
_IDENTITY_Q_ZH = ("你是谁?", "你是谁？", "你叫什么名字？", "介绍一下你自己。")

_DESCRIBE_Q = ("Describe the image.", "What do you see?", "Describe what you see.",
               "What is in the image?")
_COUNT_ALL_Q = ("How many shapes are there?", "How many shapes do you see?",
                "Count the shapes.")
_NUMBER = {0: "no", 1: "one", 2: "two", 3: "three"}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Shape:
    """One filled shape: its kind, colour name, grid cell and pixel box."""

    kind: str
    color: str
    cell: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the bounding box (x, y)."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def triple(self) -> tuple[str, str, str]:
        """``(color, kind, cell)``, the unit compared by :func:`caption_tuples`."""
        return (self.color, self.kind, self.cell)

    @property
    def phrase(self) -> str:
        """E.g. ``"a red circle at the top left"``."""
        return f"a {self.color} {self.kind} at the {self.cell}"


@dataclass(frozen=True)
class Scene:
    """A canvas side length, its shapes in reading (row-major cell) order, and a texture seed."""

    size: int
    shapes: tuple[Shape, ...]
    seed: int


@dataclass(frozen=True)
class QA:
    """One training/eval example for a scene.

    ``target`` is the single shape the answer names for unambiguous
    color/where/exists-yes questions (pointing-game ground truth), else None.
    """

    task: str
    question: str
    thinking: str
    answer: str
    target: Shape | None

    @property
    def lang(self) -> str:
        """``"zh"`` if the question contains CJK characters, else ``"en"``."""
        return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in self.question) else "en"


# ------------------------------------------------------------------------ scenes


def cell_bounds(cell: str, size: int) -> tuple[float, float, float, float]:
    """Pixel bounds ``(x0, y0, x1, y1)`` of a grid cell on a ``size`` canvas."""
    idx = CELLS.index(cell)
    row, col = divmod(idx, 3)
    step = size / 3.0
    return (col * step, row * step, (col + 1) * step, (row + 1) * step)


def random_scene(rng: random.Random, size: int = 224) -> Scene:
    """Sample a scene with 1-3 non-overlapping shapes in distinct grid cells.

    Each shape's box is square with side 18-30% of ``size`` and lies entirely
    inside its cell, so boxes never overlap.
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    n = rng.randint(1, 3)
    cells = sorted(rng.sample(range(9), n))
    step = size / 3.0
    lo = int(np.ceil(SHAPE_FRAC[0] * size))
    hi = int(np.floor(SHAPE_FRAC[1] * size))
    shapes = []
    for idx in cells:
        side = rng.randint(lo, hi)
        row, col = divmod(idx, 3)
        slack = max(0.0, (step - side) / 2.0 - 1.0)
        jit = min(JITTER_FRAC * size, slack)
        cx = (col + 0.5) * step + rng.uniform(-jit, jit)
        cy = (row + 0.5) * step + rng.uniform(-jit, jit)
        # clamp so the box stays strictly inside the cell
        x0 = int(round(cx - side / 2.0))
        y0 = int(round(cy - side / 2.0))
        x0 = min(max(x0, int(np.ceil(col * step))), int(np.floor((col + 1) * step)) - side)
        y0 = min(max(y0, int(np.ceil(row * step))), int(np.floor((row + 1) * step)) - side)
        shapes.append(Shape(kind=rng.choice(SHAPES), color=rng.choice(COLORS),
                            cell=CELLS[idx], box=(x0, y0, x0 + side, y0 + side)))
    return Scene(size=size, shapes=tuple(shapes), seed=rng.getrandbits(32))


def _triangle_points(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Upward-pointing isosceles triangle filling the box (apex top-centre)."""
    x0, y0, x1, y1 = box
    return [((x0 + x1 - 1) / 2.0, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image; identical output for identical scenes."""
    size = scene.size
    rs = np.random.default_rng(scene.seed)
    # light neutral background with a slight tint, a faint gradient and small noise
    base = rs.uniform(222, 246) + rs.uniform(-5, 5, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    grad = rs.uniform(-5, 5) * ramp[None, :, None] + rs.uniform(-5, 5) * ramp[:, None, None]
    noise = rs.normal(0.0, rs.uniform(1.5, 4.0), size=(size, size, 3))
    bg = np.clip(base[None, None, :] + grad + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        rgb = tuple(int(np.clip(c + rs.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255))
                    for c in COLOR_RGB[shape.color])
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        elif shape.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        elif shape.kind == "triangle":
            draw.polygon(_triangle_points(shape.box), fill=rgb)
        else:  # pragma: no cover - guarded by SHAPES
            raise ValueError(f"unknown shape kind {shape.kind!r}")
    return img


def scene_tuples(scene: Scene) -> set[tuple[str, str, str]]:
    """The set of ``(color, kind, cell)`` triples present in a scene."""
    return {s.triple for s in scene.shapes}


# ---------------------------------------------------------------------- language


def _noun(color: str | None, kind: str | None, plural: bool = False) -> str:
    """Noun phrase without article: ``red circle``, ``red shapes``, ``triangle``."""
    noun = kind or "shape"
    if plural:
        noun += "s"
    return f"{color} {noun}" if color else noun


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _listing(shapes: Sequence[Shape]) -> str:
    return _join([s.phrase for s in shapes])


def _seen(scene: Scene) -> str:
    return f"I see {_listing(scene.shapes)}."


def _there_are(n: int, color: str | None, kind: str | None) -> str:
    """``There is one red circle`` / ``There are two circles`` (no final period)."""
    if n == 1:
        return f"There is one {_noun(color, kind)}"
    return f"There are {_NUMBER[n]} {_noun(color, kind, plural=True)}"


def _matches(scene: Scene, color: str | None, kind: str | None) -> list[Shape]:
    return [s for s in scene.shapes
            if (color is None or s.color == color) and (kind is None or s.kind == kind)]


def _pick_reference(scene: Scene, rng: random.Random, present: bool,
                    mode: str) -> tuple[str | None, str | None]:
    """Choose a (color, kind) reference; ``mode`` is ``both``, ``color`` or ``kind``.

    With ``present`` the reference matches at least one shape, otherwise none
    (falls back to a present reference when no absent one exists).
    """
    def ref_of(c: str, k: str) -> tuple[str | None, str | None]:
        return (c if mode in ("both", "color") else None, k if mode in ("both", "kind") else None)

    if not present:
        options = sorted({ref_of(c, k) for c in COLORS for k in SHAPES})
        absent = [r for r in options if not _matches(scene, *r)]
        if absent:
            return rng.choice(absent)
    s = rng.choice(scene.shapes)
    return ref_of(s.color, s.kind)


# -------------------------------------------------------------------------- tasks


def _qa_describe(scene: Scene, rng: random.Random) -> QA:
    n = len(scene.shapes)
    head = "There is one shape" if n == 1 else f"There are {_NUMBER[n]} shapes"
    answer = f"{head}: {_listing(scene.shapes)}."
    thinking = f"{_seen(scene)} The question asks me to describe the image."
    return QA("describe", rng.choice(_DESCRIBE_Q), thinking, answer, None)


def _qa_color(scene: Scene, rng: random.Random) -> QA:
    seen = _seen(scene)
    if rng.random() < 0.3:
        # refer by place: "What color is the shape at the top left?"
        occupied = [s.cell for s in scene.shapes]
        if rng.random() < 0.8 or len(occupied) == 9:
            cell = rng.choice(occupied)
        else:
            cell = rng.choice([c for c in CELLS if c not in occupied])
        question = f"What color is the shape at the {cell}?"
        hits = [s for s in scene.shapes if s.cell == cell]
        about = f"The question asks about the shape at the {cell}."
        if not hits:
            answer = f"There is no shape at the {cell}."
            return QA("color", question, f"{seen} {about} There is none.", answer, None)
        s = hits[0]
        answer = f"The {s.kind} at the {cell} is {s.color}."
        return QA("color", question, f"{seen} {about} It is a {s.color} {s.kind}.", answer, s)

    _, kind = _pick_reference(scene, rng, present=rng.random() < 0.85, mode="kind")
    assert kind is not None
    question = f"What color is the {kind}?"
    about = f"The question asks about the {kind}."
    hits = _matches(scene, None, kind)
    if not hits:
        answer = f"There is no {kind}."
        return QA("color", question, f"{seen} {about} There is no {kind}.", answer, None)
    if len(hits) == 1:
        s = hits[0]
        answer = f"The {kind} is {s.color}."
        return QA("color", question, f"{seen} {about} It is {s.color}.", answer, s)
    colors = [s.color for s in hits]
    if len(set(colors)) == 1:
        detail = f"both are {colors[0]}" if len(hits) == 2 else f"all three are {colors[0]}"
    else:
        detail = _join([f"one is {c}" for c in colors])
    head = _there_are(len(hits), None, kind)
    answer = f"{head}: {detail}."
    return QA("color", question, f"{seen} {about} {head}.", answer, None)


def _qa_where(scene: Scene, rng: random.Random) -> QA:
    mode = rng.choices(("both", "color", "kind"), weights=(0.5, 0.25, 0.25))[0]
    color, kind = _pick_reference(scene, rng, present=rng.random() < 0.8, mode=mode)
    ref = _noun(color, kind)
    question = f"Where is the {ref}?"
    about = f"The question asks about the {ref}."
    seen = _seen(scene)
    hits = _matches(scene, color, kind)
    if not hits:
        answer = f"There is no {ref}."
        return QA("where", question, f"{seen} {about} There is no {ref}.", answer, None)
    if len(hits) == 1:
        s = hits[0]
        answer = f"The {s.color} {s.kind} is at the {s.cell}."
        thinking = f"{seen} {about} It is the {s.color} {s.kind} at the {s.cell}."
        return QA("where", question, thinking, answer, s)
    head = _there_are(len(hits), color, kind)
    answer = f"{head}: {_listing(hits)}."
    return QA("where", question, f"{seen} {about} {head}.", answer, None)


def _qa_count(scene: Scene, rng: random.Random) -> QA:
    seen = _seen(scene)
    r = rng.random()
    if r < 0.6:
        question = rng.choice(_COUNT_ALL_Q)
        color, kind = None, None
    else:
        mode = "kind" if r < 0.8 else "color"
        color, kind = _pick_reference(scene, rng, present=rng.random() < 0.75, mode=mode)
        question = f"How many {_noun(color, kind, plural=True)} are there?"
    n = len(_matches(scene, color, kind))
    plural = _noun(color, kind, plural=True)
    answer = f"There are no {plural}." if n == 0 else f"{_there_are(n, color, kind)}."
    thinking = f"{seen} The question asks how many {plural} there are. I count {_NUMBER[n]}."
    return QA("count", question, thinking, answer, None)


def _qa_exists(scene: Scene, rng: random.Random) -> QA:
    mode = rng.choices(("both", "color", "kind"), weights=(0.7, 0.15, 0.15))[0]
    color, kind = _pick_reference(scene, rng, present=rng.random() < 0.5, mode=mode)
    ref = _noun(color, kind)
    question = f"Is there a {ref}?"
    about = f"The question asks about a {ref}."
    seen = _seen(scene)
    hits = _matches(scene, color, kind)
    if not hits:
        answer = f"No, there is no {ref}."
        return QA("exists", question, f"{seen} {about} There is no {ref}.", answer, None)
    if len(hits) == 1:
        s = hits[0]
        answer = f"Yes, there is {s.phrase}."
        return QA("exists", question, f"{seen} {about} I see {s.phrase}.", answer, s)
    head = _there_are(len(hits), color, kind)
    answer = f"Yes, {head[0].lower()}{head[1:]}: {_listing(hits)}."
    return QA("exists", question, f"{seen} {about} {head}.", answer, None)


def _qa_identity(scene: Scene, rng: random.Random) -> QA:
    if rng.random() < 0.3:
        q = rng.choice(_IDENTITY_Q_ZH)
        thinking = "The user asks who I am. The question is in Chinese."
        return QA("identity", q, thinking, IDENTITY_ANSWER_ZH, None)
    q = rng.choice(_IDENTITY_Q_EN)
    return QA("identity", q, "The user asks who I am.", IDENTITY_ANSWER_EN, None)


_TASK_FNS = {
    "describe": _qa_describe,
    "color": _qa_color,
    "where": _qa_where,
    "count": _qa_count,
    "exists": _qa_exists,
    "identity": _qa_identity,
}


def make_qa(scene: Scene, rng: random.Random, task: str | None = None) -> QA:
    """Make one question/thinking/answer example about ``scene``.

    ``task`` forces one of :data:`TASKS`; otherwise it is sampled with
    :data:`TASK_WEIGHTS`.  Identity examples do not depend on the scene (the
    caller may pair them with or without the image).
    """
    if task is None:
        task = rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
    if task not in _TASK_FNS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return _TASK_FNS[task](scene, rng)


# ---------------------------------------------------------------------- evaluation

_CELL_ALT = "|".join(sorted((re.escape(c) for c in CELLS), key=len, reverse=True))
_TRIPLE_RE = re.compile(
    rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\s+(?:at|in)\s+the\s+({_CELL_ALT})\b",
    re.IGNORECASE,
)


def caption_tuples(text: str) -> set[tuple[str, str, str]]:
    """Parse ``(color, shape, cell)`` triples out of a description answer.

    Matches phrases like ``"red circle at the top left"`` (case-insensitive),
    so it can score free-running model output against :func:`scene_tuples`.
    """
    text = re.sub(r"\s+", " ", text)
    return {(c.lower(), k.lower(), cell.lower()) for c, k, cell in _TRIPLE_RE.findall(text)}
