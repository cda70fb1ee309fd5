"""Auxiliary training heads for AutoGLM-Phone-Tiny: direct supervision for the two encoders.

The language-model loss reaches the vision and speech encoders only through attention, so a
tiny model trained for an hour learns colours and places long before shape kinds, and hardly
learns speech. These heads give each encoder its own target during training (they are not part
of the exported model):

* vision: for every cell of the 3x3 grid, the patch features the adapter hands the decoder,
  averaged over the patches whose centre lies in that cell, must name what the cell holds
  (empty, or one of 3 shapes x 4 colours = 13 classes);
* speech: the adapter's audio features, averaged over a recording, must name the question's
  task and the colour and shape words it mentions.

The heads read the adapter's outputs through forward hooks, so the model's code is unchanged.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapesworld import CELLS, COLORS, SHAPES, TASKS

CELL_CLASSES = 1 + len(SHAPES) * len(COLORS)
_COLOR_RE = {c: re.compile(rf"\b{c}\b") for c in COLORS}
_SHAPE_RE = {s: re.compile(rf"\b{s}s?\b") for s in SHAPES}


def cell_labels(scene) -> list[int]:
    """9 labels, row-major: 0 empty, else 1 + shape * 4 + colour."""
    out = [0] * len(CELLS)
    for s in scene.shapes:
        out[CELLS.index(s.cell)] = 1 + SHAPES.index(s.kind) * len(COLORS) + COLORS.index(s.color)
    return out


def question_labels(qa) -> tuple[int, int, int]:
    """(task, colour word or 0, shape word or 0) of a question."""
    text = qa.question.lower()
    color = next((i + 1 for i, c in enumerate(COLORS) if _COLOR_RE[c].search(text)), 0)
    shape = next((i + 1 for i, s in enumerate(SHAPES) if _SHAPE_RE[s].search(text)), 0)
    return TASKS.index(qa.task), color, shape


def patch_cells(grid: int) -> torch.Tensor:
    """(grid*grid,) the 3x3 cell of each patch's centre."""
    centres = (torch.arange(grid) + 0.5) / grid  # fraction of the side
    band = (centres * 3).floor().clamp(max=2).long()
    return (band[:, None] * 3 + band[None, :]).reshape(-1)


class AuxHeads(nn.Module):
    def __init__(self, hidden: int, grid: int):
        super().__init__()
        cells = patch_cells(grid)
        pool = F.one_hot(cells, 9).float().T  # (9, patches)
        self.register_buffer("pool", pool / pool.sum(1, keepdim=True), persistent=False)
        self.vision = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, CELL_CLASSES))
        self.audio = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, len(TASKS) + len(COLORS) + 1 + len(SHAPES) + 1))
        self._vision_out = None
        self._audio_out = None
        self._audio_lengths = None
        self._handles = []

    def attach(self, model) -> "AuxHeads":
        backbone = model.model
        self._handles = [
            backbone.adapter.vision.register_forward_hook(lambda m, a, o: setattr(self, "_vision_out", o)),
            backbone.adapter.audio.register_forward_hook(lambda m, a, o: setattr(self, "_audio_out", o)),
            backbone.audio_tower.register_forward_hook(
                lambda m, a, o: setattr(self, "_audio_lengths", [t.shape[0] for t in o])),
        ]
        return self

    def loss(self, cells: torch.Tensor | None, questions: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """cells (images, 9) and questions (recordings, 3) labels, in batch order."""
        total, parts = 0.0, {}
        if cells is not None and self._vision_out is not None:
            pooled = torch.einsum("cp,npd->ncd", self.pool, self._vision_out.float())  # (images, 9, D)
            logits = self.vision(pooled)
            parts["cells"] = F.cross_entropy(logits.reshape(-1, CELL_CLASSES), cells.reshape(-1))
            parts["cell_acc"] = (logits.argmax(-1) == cells).float().mean().detach()
            total = total + parts["cells"]
        if questions is not None and self._audio_out is not None:
            pooled = torch.stack([x.mean(0) for x in self._audio_out.float().split(self._audio_lengths)])
            logits = self.audio(pooled)
            nt, nc = len(TASKS), len(COLORS) + 1
            heads = (logits[:, :nt], logits[:, nt:nt + nc], logits[:, nt + nc:])
            losses = [F.cross_entropy(h, questions[:, i]) for i, h in enumerate(heads)]
            parts["speech"] = sum(losses) / 3
            parts["speech_acc"] = torch.stack(
                [(h.argmax(-1) == questions[:, i]).float() for i, h in enumerate(heads)]).all(0).float().mean().detach()
            total = total + parts["speech"]
        self._vision_out = self._audio_out = self._audio_lengths = None
        return total, parts


# ------------------------------------------------------------------ focus supervision
#
# The caption-focus map the app draws for a token is the head-mean attention of the query that
# chose the token, over the image's patch keys. Trained on the language-model loss alone, the
# tiny decoder reads the image through whatever heads are convenient, so the map's peak lands on
# the named shape only about half the time, and a wrong read is also the commonest wrong answer.
# This loss asks, in a few chosen layers, that while the model writes about one shape its
# image attention (renormalised over the patches) falls on that shape's patches.


def _cell_pattern(cell: str) -> str:
    # "top" must not match the start of "top left"; "left" is never the tail of "bottom left"
    # because the phrase always reads "at the <cell>"
    return re.escape(cell) + r"(?! left| right)\b"


def focus_spans(target: str, qa, scene) -> list[tuple[int, int, object]]:
    """Character spans of the assistant ``target`` text that are about one shape of ``scene``.

    * every "<colour> <shape> at the <cell>" phrase names that shape (the "I see" list, captions,
      the listing of several matches);
    * when the question resolves to one shape (``qa.target``), the trace's last sentence and the
      whole answer are about it.
    Phrases win where they overlap a whole-answer span.
    """
    spans: list[tuple[int, int, object]] = []
    for s in scene.shapes:
        pat = re.compile(rf"\b{s.color} {s.kind} at the {_cell_pattern(s.cell)}")
        spans += [(m.start(), m.end(), s) for m in pat.finditer(target)]
    if qa.target is not None:
        end = target.find("</think>")
        answer_at = end + len("</think>") if end >= 0 else 0
        stop = target.find("<|endoftext|>")
        stop = len(target) if stop < 0 else stop
        if end >= 0:
            think = target[: end]
            last = think.rstrip(". ").rfind(". ")
            if last >= 0:
                spans.append((last + 2, end, qa.target))
        spans.append((answer_at, stop, qa.target))
    return spans


def patch_targets(shape, scene_size: int, grid: int) -> list[int]:
    """Row-major indices of the patches whose centre lies inside the shape's box."""
    x0, y0, x1, y1 = shape.box
    out = []
    for r in range(grid):
        cy = (r + 0.5) * scene_size / grid
        for c in range(grid):
            cx = (c + 0.5) * scene_size / grid
            if x0 <= cx < x1 and y0 <= cy < y1:
                out.append(r * grid + c)
    return out


def focus_targets(offsets: list[tuple[int, int]], spans, scene_size: int, grid: int) -> list[tuple[int, list[int]]]:
    """(index of a target token, its shape's patches) for every target token inside a span.

    Phrase spans come first in ``spans`` and win; a token is assigned once."""
    out, taken = [], set()
    for a, b, shape in spans:
        patches = patch_targets(shape, scene_size, grid)
        if not patches:
            continue
        for j, (s, e) in enumerate(offsets):
            if j in taken or e <= s or e <= a or s >= b:
                continue
            taken.add(j)
            out.append((j, patches))
    return sorted(out)


class FocusSupervision:
    """Training-only loss on the decoder's image attention, through the attention modules'
    ``focus_probe`` hook (the same hook the engine's focus probe uses).

    ``targets`` per sample: (query position, patch indices) pairs, where the query position is
    the one whose output picks a token about that shape, and the image's first patch position.
    """

    def __init__(self, model, layers: list[int]):
        self.layers = set(layers)
        self.modules = [layer.self_attn for layer in model.model.layers]
        self.grid = model.config.image_size // model.config.patch_size
        self._qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attach(self) -> "FocusSupervision":
        for m in self.modules:
            m.focus_probe = self
        return self

    def detach(self) -> None:
        for m in self.modules:
            m.focus_probe = None

    def __call__(self, layer: int, q, k, mask, probs, n_mem: int) -> None:
        if layer in self.layers:
            self._qk[layer] = (q, k, n_mem)

    def loss(self, rows: list[tuple[int, int, int, list[int]]]) -> torch.Tensor | None:
        """rows: (batch index, query position, first image position, target patches).
        Mean over rows and layers of -log(image attention mass on the target patches)."""
        qk, self._qk = self._qk, {}
        if not rows or not qk:
            return None
        P = self.grid * self.grid
        dev = next(iter(qk.values()))[0].device
        b = torch.tensor([r[0] for r in rows], device=dev)
        qpos = torch.tensor([r[1] for r in rows], device=dev)
        img = torch.tensor([r[2] for r in rows], device=dev)[:, None] + torch.arange(P, device=dev)[None, :]  # (N, P)
        want = torch.zeros(len(rows), P)
        for i, r in enumerate(rows):
            want[i, r[3]] = 1.0
        want = want.to(dev)
        losses = []
        for layer in sorted(qk):
            q, k, n_mem = qk[layer]
            H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
            qs = q[b, :, qpos, :].float().view(len(rows), Hkv, H // Hkv, D)  # (N, Hkv, g, D)
            ks = k[b[:, None], :, img + n_mem, :].float().permute(0, 2, 1, 3)  # (N, Hkv, P, D)
            scores = torch.einsum("nkgd,nkpd->nkgp", qs, ks) * D**-0.5
            probs = scores.softmax(-1).reshape(len(rows), H, P).mean(1)  # head mean, (N, P)
            mass = (probs * want).sum(-1)
            losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
        return torch.stack(losses).mean()
