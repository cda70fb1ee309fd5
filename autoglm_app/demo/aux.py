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
