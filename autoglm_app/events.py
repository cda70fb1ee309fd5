"""The engine's contract: what a request carries in, and the events that stream out.

One request -> one ordered stream:
    Queued(position)  (again whenever the position changes)
    Notice(message)*  (e.g. oldest turns dropped to fit the context)
    Reasoning(text) / Answer(text) deltas, interleaved with Focus and Routing records
    Stats
    Done | Error
The UI and the API are two renderers of this stream; neither touches the model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- requests


@dataclass
class Audio:
    """A recording as a client sent it: samples (frames,) or (frames, channels), any dtype and rate."""

    samples: np.ndarray
    sample_rate: int


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)


@dataclass
class Options:
    enable_thinking: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 512
    min_new_tokens: int = 0  # end-of-text is suppressed before this many tokens (benchmarks)
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    focus: bool = True  # emit Focus events
    routing: bool = True  # emit Routing events
    focus_aggregation: str | None = None  # "mean" | "max"; None = the model's default
    focus_layers: tuple[int, int] | None = None  # [start, end) of decoder layers; None = default


@dataclass
class ChatRequest:
    messages: list[Message]
    options: Options = field(default_factory=Options)
    session_id: str = "default"
    priority: Literal["interactive", "batch"] = "interactive"


# ----------------------------------------------------------------------------- events


@dataclass
class Queued:
    position: int  # 0 = running now; n = n requests ahead


@dataclass
class Notice:
    message: str


@dataclass
class Reasoning:
    text: str


@dataclass
class Answer:
    text: str


@dataclass
class Focus:
    """Where one generated token looked: one (rows, cols) map per image, one (frames,) per recording.

    Maps are attention probabilities (non-negative) aggregated over heads and layers; each
    map sums to the attention mass the token paid to that image / recording.
    """

    index: int  # position of the token among the generated tokens
    token: str
    phase: Literal["reasoning", "answer"]
    images: list[np.ndarray]  # aggregated by the request's rule: (rows, cols) each
    audios: list[np.ndarray]  # (frames,) each
    # the same before aggregation over layers (head-mean per layer), for re-aggregation in the UI
    per_layer_images: list[np.ndarray] = field(default_factory=list)  # (layers, rows, cols)
    per_layer_audios: list[np.ndarray] = field(default_factory=list)  # (layers, frames)


def aggregate_layers(per_layer: np.ndarray, rule: str = "mean", layers: tuple[int, int] | None = None) -> np.ndarray:
    """The one rule that turns a (layers, ...) stack of head-mean maps into one map: the mean over
    decoder layers [start, end) (all when ``layers`` is None), or their maximum. A range outside the
    stack or an unknown rule is a ValueError: callers with a range from a slider clamp it first."""
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= per_layer.shape[0]:
            raise ValueError(f"focus layer range {tuple(layers)} is outside 0..{per_layer.shape[0]}")
        per_layer = per_layer[start:end]
    if rule == "max":
        return np.maximum.reduce(per_layer, axis=0)
    if rule == "mean":  # add.reduce: the same mean without np.mean's per-call overhead (a hot path)
        return np.add.reduce(per_layer, axis=0) * (1.0 / per_layer.shape[0])
    raise ValueError(f"unknown focus aggregation {rule!r}: use 'mean' or 'max'")


@dataclass
class LayerRoute:
    layer: int
    experts: list[int]
    weights: list[float]


@dataclass
class ExpertCounts:
    """The running routing counts of one request as of one token: copies the probe will not touch again."""

    layers: list[int]  # decoder layer index of each MoE layer
    experts: int  # experts per layer
    top_k: int  # experts per token
    tokens: dict[str, int]  # tokens routed in "prefill" / "decode"
    prefill: np.ndarray  # (moe layers, experts) int64 expert choices
    decode: np.ndarray  # (moe layers, experts) int64
    by_modality: dict[str, np.ndarray]  # "text" / "image" / "audio" -> (moe layers, experts) int64
    dropped: np.ndarray  # (moe layers,) choices dropped by an expert's capacity limit


def balance_cv_rows(load: np.ndarray) -> list[float]:
    """Coefficient of variation of each row of a (layers, experts) load (0 = perfectly even), written
    with bare ufunc reductions rather than np.mean / np.std (it can run once per token)."""
    x = load.astype(np.float64)
    E = x.shape[1]
    mean = np.add.reduce(x, axis=1) / E
    var = np.add.reduce(x * x, axis=1) / E - mean * mean
    std = np.sqrt(np.maximum(var, 0.0))
    return (std / np.maximum(mean, 1e-12) * (mean > 0)).tolist()


def balance_entropy_rows(load: np.ndarray) -> list[float]:
    """Entropy of each row of a (layers, experts) load normalised to [0, 1] (1 = perfectly even)."""
    if load.shape[1] < 2:
        return [0.0] * load.shape[0]
    total = np.add.reduce(load, axis=1)
    p = load / np.maximum(total, 1)[:, None]
    plogp = p * np.log(p + (p == 0))  # 0 log 0 = 0
    return (0.0 - np.add.reduce(plogp, axis=1) / math.log(load.shape[1])).tolist()


def expert_load(counts: ExpertCounts) -> dict:
    """The running load as consumers read it (``Routing.load``): per-layer counts as lists, and balance figures."""
    total = counts.prefill + counts.decode
    return {
        "layers": counts.layers,
        "experts": counts.experts,
        "top_k": counts.top_k,
        "tokens": counts.tokens,
        "prefill": counts.prefill.tolist(),
        "decode": counts.decode.tolist(),
        "total": total.tolist(),
        "by_modality": {m: v.tolist() for m, v in counts.by_modality.items()},
        "dropped": counts.dropped.tolist(),
        "cv": balance_cv_rows(total),
        "entropy": balance_entropy_rows(total),
    }


@dataclass
class Routing:
    """Experts chosen for one generated token, plus the running counts so far.

    ``counts`` is what the engine sends (copies of the small count arrays); a dict already in
    ``load``'s shape is accepted too (a recorded or hand-built stream). ``load`` is built from the
    counts on first read, not per token: most consumers read only the newest record's load.
    """

    index: int
    token: str
    phase: Literal["reasoning", "answer"]
    layers: list[LayerRoute]
    counts: ExpertCounts | dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def load(self) -> dict:
        return self.counts if isinstance(self.counts, dict) else expert_load(self.counts)


@dataclass
class Stats:
    ttft_s: float  # time to first token (from start of work, not queueing)
    think_s: float | None  # time to end of reasoning
    reasoning_tokens: int
    answer_tokens: int
    reasoning_tps: float
    answer_tps: float
    tokens_per_second: float
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    total_s: float
    peak_memory: dict[str, int]  # device -> bytes
    finish_reason: str  # "stop" | "length" | "cancelled"
    attention: str  # "sdpa+probe" | "eager" : how focus was computed


@dataclass
class Done:
    finish_reason: str


@dataclass
class Error:
    message: str
    kind: Literal["busy", "bad_request", "internal", "cancelled", "out_of_memory"] = "internal"


Event = Queued | Notice | Reasoning | Answer | Focus | Routing | Stats | Done | Error


class EngineBusy(Exception):
    """The queue is full: the caller should retry later."""

    def __init__(self, message: str, retry_after: float = 2.0):
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(Exception):
    """The request cannot be served as sent; the message says what to change."""
