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
    # emit a Logprobs record per generated token with this many alternatives (0..MAX_TOP_LOGPROBS); None = off
    logprobs: int | None = None


MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's limit on top_logprobs


@dataclass
class ChatRequest:
    messages: list[Message]
    options: Options = field(default_factory=Options)
    session_id: str = "default"
    priority: Literal["interactive", "batch"] = "interactive"
    # token ids the reply already starts with (a branch of an earlier answer, continued from a chosen
    # alternative): fed with the prompt, not emitted again; the new tokens are numbered after them
    # and max_new_tokens counts only the new ones
    continue_from: list[int] = field(default_factory=list)


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


class Focus:
    """Where one generated token looked: one (rows, cols) map per image, one (frames,) per recording.

    Maps are attention probabilities (non-negative) aggregated over heads and layers; each
    map sums to the attention mass the token paid to that image / recording.

    ``images`` / ``audios``: aggregated by the request's rule; ``per_layer_images`` / ``per_layer_audios``: the same
    before aggregation over layers (head-mean per layer, (layers, rows, cols) / (layers, frames)), for
    re-aggregation in the UI. The engine gives none of the four: it gives ``rows``, the token's (layers, K) focus
    row over every media key, with the prompt's spans (image rows x cols, recording frames, in key order) and the
    aggregation rule, and each map is cut and aggregated when a consumer first reads it. Why: that work is then
    the reader's (the page's or the API's thread), not the decode loop's (the split and the layer mean took 20 to
    60 us of a 1 to 3 ms token on the worker, on two cores).
    """

    def __init__(self, index: int, token: str, phase: Literal["reasoning", "answer"],
                 images: list[np.ndarray] | None = None, audios: list[np.ndarray] | None = None,
                 per_layer_images: list[np.ndarray] | None = None, per_layer_audios: list[np.ndarray] | None = None,
                 *, rows: np.ndarray | None = None, spans: tuple[list[tuple[int, int]], list[int]] = ((), ()),
                 rule: tuple[str, tuple[int, int] | None] = ("mean", None)):
        self.index = index  # position of the token among the generated tokens
        self.token, self.phase = token, phase
        self._rows, self._spans, self._rule = rows, spans, rule
        self._images, self._audios = images, audios
        self._per_images, self._per_audios = per_layer_images, per_layer_audios

    def _split(self) -> None:
        per_layer, (image_shapes, audio_frames) = self._rows, self._spans
        images, audios, at = [], [], 0
        if per_layer is not None:
            for r, c in image_shapes:
                images.append(per_layer[:, at : at + r * c].reshape(-1, r, c))
                at += r * c
            for frames in audio_frames:
                audios.append(per_layer[:, at : at + frames])
                at += frames
        self._per_images, self._per_audios = images, audios

    @property
    def per_layer_images(self) -> list[np.ndarray]:
        if self._per_images is None:
            self._split()
        return self._per_images

    @property
    def per_layer_audios(self) -> list[np.ndarray]:
        if self._per_audios is None:
            self._split()
        return self._per_audios

    @property
    def images(self) -> list[np.ndarray]:
        if self._images is None:
            self._images = [aggregate_layers(m, *self._rule) for m in self.per_layer_images]
        return self._images

    @property
    def audios(self) -> list[np.ndarray]:
        if self._audios is None:
            self._audios = [aggregate_layers(m, *self._rule) for m in self.per_layer_audios]
        return self._audios

    @property
    def mass(self) -> float:
        """The attention mass the token paid to its images and recordings: the sum of its maps (one sum over the
        row when its maps are the mean over layers and nobody has cut them yet: what /metrics reads per token)."""
        rule, layers = self._rule
        if self._images is None and self._audios is None and self._rows is not None and rule == "mean":
            rows = self._rows if layers is None else self._rows[layers[0] : layers[1]]
            return float(np.add.reduce(rows, axis=None)) / max(rows.shape[0], 1)
        return sum(float(np.add.reduce(m, axis=None)) for m in (*self.images, *self.audios))

    def __repr__(self) -> str:
        return f"Focus(index={self.index}, token={self.token!r}, phase={self.phase!r})"


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
    # added for issue 20 (all optional, so hand-built counts stay valid):
    windows: dict[int, np.ndarray] = field(default_factory=dict)  # W -> (moe layers, experts) load of the last W routed tokens
    window_tokens: dict[int, int] = field(default_factory=dict)  # W -> routed tokens in that window (<= W)
    by_phase: dict[str, np.ndarray] = field(default_factory=dict)  # "reasoning" / "answer" -> decode load
    phase_tokens: dict[str, int] = field(default_factory=dict)  # "reasoning" / "answer" -> decode tokens routed
    # (prompt tokens, moe layers, top_k) int16 expert ids of every prompt token (prefill), -1 where a layer did
    # not route it; shared by every event of the request (written once, never changed), None until prefilled
    prompt_experts: np.ndarray | None = field(default=None, repr=False)


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


ROUTING_WINDOWS = (10, 100, 1000)  # routed tokens: the windows of balancedness and dead experts


def balancedness_rows(load: np.ndarray) -> list[float]:
    """SGLang's balancedness of each row of a (layers, experts) load: mean load / max load (1 = even,
    1/experts = one expert took everything); 1.0 for a row with no load (nothing to be uneven)."""
    x = np.asarray(load, dtype=np.float64)
    peak = np.maximum.reduce(x, axis=1) if x.shape[1] else np.zeros(x.shape[0])
    mean = np.add.reduce(x, axis=1) / max(x.shape[1], 1)
    return np.where(peak > 0, mean / np.maximum(peak, 1e-300), 1.0).tolist()


def dead_fraction_rows(load: np.ndarray) -> list[float]:
    """The fraction of experts in each row of a (layers, experts) load that took no token."""
    x = np.asarray(load)
    return (np.add.reduce(x == 0, axis=1) / max(x.shape[1], 1)).tolist()


def diversity_rows(load: np.ndarray) -> list[float]:
    """exp(H) / N of each row of a (layers, experts) load, H the entropy (natural log) of the row's load
    distribution and N the experts: the effective share of experts in use (1 = even, 1/N = one expert);
    0.0 for a row with no load."""
    x = np.asarray(load, dtype=np.float64)
    n = max(x.shape[1], 1)
    total = np.add.reduce(x, axis=1)
    p = x / np.maximum(total, 1e-300)[:, None]
    h = 0.0 - np.add.reduce(p * np.log(p + (p == 0)), axis=1)
    return np.where(total > 0, np.exp(h) / n, 0.0).tolist()


def _window_figures(counts: ExpertCounts, total: np.ndarray) -> dict:
    """Balancedness and dead experts per window (``"10"``, ``"100"``, ``"1000"`` routed tokens, and
    ``"all"``: the whole request), and the diversity of the whole request's load, per MoE layer."""
    loads = {str(w): c for w, c in sorted(counts.windows.items())}
    loads["all"] = total
    return {
        "window_tokens": {str(w): n for w, n in sorted(counts.window_tokens.items())},
        "balancedness": {w: balancedness_rows(c) for w, c in loads.items()},
        "dead_fraction": {w: dead_fraction_rows(c) for w, c in loads.items()},
        "diversity": diversity_rows(total),
    }


def expert_load(counts: ExpertCounts) -> dict:
    """The running load as consumers read it (``Routing.load``): per-layer counts as lists, and balance figures.

    Keys since issue 20 (the earlier ones unchanged): ``window_tokens`` {"10"|"100"|"1000": tokens in the
    window}; ``balancedness`` and ``dead_fraction`` {"10"|"100"|"1000"|"all": one value per MoE layer} (mean
    load / max load, and the share of experts with no token, over the last W routed tokens, prefill and
    decode, or the whole request); ``diversity`` (per layer, exp(H)/N of the request's load); ``by_phase``
    {"reasoning"|"answer": (layers, experts)} the decode load split by the phase of the routed token, and
    ``phase_tokens`` the decode tokens of each phase (both sum to ``decode`` / ``tokens["decode"]``).
    """
    total = counts.prefill + counts.decode
    return {
        **_expert_load_v1(counts, total),
        **_window_figures(counts, total),
        "by_phase": {p: v.tolist() for p, v in counts.by_phase.items()},
        "phase_tokens": dict(counts.phase_tokens),
    }


def routing_summary(load: dict) -> dict:
    """A turn's routing in a few figures per MoE layer (``Stats.routing``), from a load dict (``Routing.load``
    of the turn's last token): layers, tokens, balancedness / dead_fraction by window, diversity, phase_tokens."""
    keys = ("layers", "experts", "top_k", "tokens", "window_tokens", "balancedness", "dead_fraction", "diversity",
            "phase_tokens")
    return {k: load[k] for k in keys if k in load}


def routed_experts_array(prompt: np.ndarray | None, routes: list, layers: list[int], top_k: int) -> np.ndarray:
    """The routed experts of a request in vLLM's returned-routed-experts layout: an int16 array
    ``[tokens, moe_layers, top_k]``, one row per token that went through the model, in order: every
    prompt token (``prompt``, the RoutingProbe's prefill record, ``ExpertCounts.prompt_experts``), then
    every generated token but the last (as in vLLM, the last token sampled is never forwarded).

    ``routes`` holds one entry per generated token in index order: the ``Routing.layers`` of its event
    (``LayerRoute``s) or ``(layer, experts, weights)`` tuples as the page records them. Event i carries
    the routing of the forward that chose token i, i.e. of the last prompt token for i = 0 (the same as
    ``prompt[-1]``) and of generated token i - 1 after it; so the rows are ``prompt`` then ``routes[1:]``.
    Without ``prompt`` (not recorded) the rows start at the last prompt token: ``routes[0:]``. A layer a
    route does not name is -1.
    """
    slot = {layer: i for i, layer in enumerate(layers)}
    picked = routes[1:] if prompt is not None else routes
    out = np.full((len(picked), len(layers), top_k), -1, np.int16)
    for row, token in enumerate(picked):
        for r in token:
            layer, experts = (r.layer, r.experts) if isinstance(r, LayerRoute) else (r[0], r[1])
            if layer in slot:
                out[row, slot[layer], : len(experts)] = experts[:top_k]
    if prompt is None:
        return out
    return np.concatenate([np.asarray(prompt, np.int16).reshape(-1, len(layers), top_k), out])


def _expert_load_v1(counts: ExpertCounts, total: np.ndarray) -> dict:
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


_EMPTY: dict = {}  # Routing's counts when none are given (a fresh dict each event)


class Routing:
    """Experts chosen for one generated token, plus the running counts so far.

    ``counts`` is what the engine sends (copies of the small count arrays), taken when the event is
    delivered: the Routing events delivered together (a few milliseconds of tokens) share the counts as of
    the last of them, which is what every consumer reads (the newest load). The engine takes them at most
    every 50 ms (``generation.COUNTS_EVERY_S``): an event delivered in between has ``counts`` None (``load``
    None: keep the newest counts you have, ``newest_counted``), except that the request's newest event has its
    final counts by the time its Stats arrive. A dict already in ``load``'s shape is accepted too (a recorded or
    hand-built stream). ``load`` is built from the counts on first read, not per token.

    ``layers``: the token's experts and gate weights per MoE layer. A batched decode step gives ``route`` instead
    (the MoE layers' ids and its (layers, k) experts and weights arrays) and the LayerRoute list is built when a
    reader first asks for it, on the reader's thread (at 40 layers that list was 80 Python lists a token).
    """

    def __init__(self, index: int, token: str, phase: Literal["reasoning", "answer"],
                 layers: list[LayerRoute] | None = None, counts: ExpertCounts | dict | None = _EMPTY, *,
                 route: tuple[list[int], np.ndarray, np.ndarray] | None = None):
        self.index, self.token, self.phase = index, token, phase
        self._layers, self._route = layers, route
        self.counts = {} if counts is _EMPTY else counts  # (not given: no counts, as a hand-built stream has)

    @property
    def layers(self) -> list[LayerRoute]:
        if self._layers is None:
            ids, experts, weights = self._route if self._route is not None else ([], (), ())
            self._layers = [LayerRoute(layer, e, w) for layer, e, w in
                            zip(ids, np.asarray(experts).tolist(), np.asarray(weights).tolist())]
        return self._layers

    def arrays(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The token's (MoE layer ids, (layers, k) experts, (layers, k) gate weights): the step's own arrays when
        it gave them, else read off ``layers``."""
        if self._route is not None:
            return self._route
        layers = self.layers
        return ([r.layer for r in layers], np.asarray([r.experts for r in layers], dtype=np.int64),
                np.asarray([r.weights for r in layers], dtype=np.float64))

    def __repr__(self) -> str:
        return f"Routing(index={self.index}, token={self.token!r}, phase={self.phase!r})"

    @property
    def load(self) -> dict | None:
        counts = self.counts
        if counts is None or isinstance(counts, dict):
            return counts
        built = self.__dict__.get("_load")
        if built is None or built[0] is not counts:  # (counts set once, by the engine; built once per value)
            built = self.__dict__["_load"] = (counts, expert_load(counts))
        return built[1]

    @property
    def prompt_experts(self) -> np.ndarray | None:
        """(prompt tokens, moe layers, top_k) int16 experts of the prompt (see ``routed_experts_array``);
        None for a recorded or hand-built stream."""
        c = self.counts
        return None if c is None or isinstance(c, dict) else c.prompt_experts


def newest_counted(newest: Routing | None, counted: Routing | None) -> Routing | None:
    """Of a request's newest Routing event and the newest one that came with counts, the one whose counts to read:
    the newest once it has them (its counts can be filled in when the request ends)."""
    return newest if newest is not None and newest.counts is not None else counted


@dataclass
class Alternative:
    token: str  # the token's own text (decoded alone; a piece of a multi-byte character shows as U+FFFD)
    token_id: int
    logprob: float  # natural log of its probability
    bytes: bytes = b""  # its raw bytes (a piece of a multi-byte character has a few of its bytes)


@dataclass
class Logprobs:
    """How sure the model was of one generated token: the log-probability of the token it emitted, the
    ``top`` most likely tokens at that position (most likely first), and the entropy (nats) of the whole
    next-token distribution. All from the model's own distribution (the raw logits' log-softmax, before
    temperature, top-k/top-p, penalties or banned ids: vLLM's default), so they do not depend on how
    the token was sampled."""

    index: int  # position of the token among the generated tokens (as Focus.index)
    token: str
    token_id: int  # -1 where the backend does not say (a remote server's logprobs carry text only)
    logprob: float
    entropy: float | None  # None where the backend does not say (a remote server sends the top k only)
    top: list[Alternative]
    phase: Literal["reasoning", "answer"] = "answer"
    bytes: bytes = b""


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
    routing: dict | None = None  # the turn's routing_summary (MoE models with routing on), else None


@dataclass
class Done:
    finish_reason: str


@dataclass
class Error:
    message: str
    kind: Literal["busy", "bad_request", "internal", "cancelled", "out_of_memory"] = "internal"


Event = Queued | Notice | Reasoning | Answer | Focus | Routing | Logprobs | Stats | Done | Error


class EngineBusy(Exception):
    """The queue is full: the caller should retry later."""

    def __init__(self, message: str, retry_after: float = 2.0):
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(Exception):
    """The request cannot be served as sent; the message says what to change."""
