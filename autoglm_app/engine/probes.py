"""Probes that plug into a forward pass without changing its shape.

FocusProbe: for the newest query of each forward (the position whose output picks the
next token) it computes that one attention row per head against all keys, in float32,
and keeps only the entries of image / audio key positions. The attention itself keeps
running on the fast kernel (SDPA); under eager attention the probe reads the
probabilities the layer already computed instead.

RoutingProbe: forward hooks on the router modules record, for every routed token,
the chosen experts and gate weights; it keeps running load per layer and expert,
split by prefill / decode and by the modality of the token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..modeling.processing_autoglm import AudioSpan, ImageSpan

# ----------------------------------------------------------------------------- focus


class FocusProbe:
    def __init__(self, attention_modules: list, image_spans: list[ImageSpan], audio_spans: list[AudioSpan]):
        self.modules = attention_modules
        self.image_spans = image_spans
        self.audio_spans = audio_spans
        positions = [torch.arange(s.start, s.start + s.rows * s.cols) for s in image_spans]
        positions += [torch.arange(s.start, s.start + s.frames) for s in audio_spans]
        self.positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        self.rows: dict[int, torch.Tensor] = {}  # layer -> (K,) head-mean attention of the newest query
        self._keys: dict[tuple, torch.Tensor] = {}  # (device, memory slots) -> key indices, built once
        self.mode = "sdpa+probe"

    def __enter__(self) -> "FocusProbe":
        for m in self.modules:
            m.focus_probe = self
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m.focus_probe = None

    def __call__(self, layer: int, q, k, mask, probs, n_mem: int) -> None:
        if self.positions.numel() == 0:
            return
        keys = self._keys.get((k.device, n_mem))
        if keys is None:
            keys = self._keys[(k.device, n_mem)] = self.positions.to(k.device) + n_mem
        if probs is not None:  # eager attention computed the full rows already
            self.mode = "eager"
            row = probs[0, :, -1, :].float()  # (H, S)
        else:
            B, H, T, D = q.shape
            g = H // k.shape[1]
            ql = q[0, :, -1, :].float().view(k.shape[1], g, D)  # (Hkv, g, D)
            scores = torch.einsum("kgd,ksd->kgs", ql, k[0].float()) * (D**-0.5)
            if mask is not None:
                scores = scores.masked_fill(~mask[0, 0, -1].to(scores.device), float("-inf"))
            row = scores.softmax(-1).reshape(H, -1)
        self.rows[layer] = row.index_select(1, keys).mean(0)

    def take(self) -> np.ndarray:
        """(layers, K) rows recorded during the last forward, then cleared."""
        layers = sorted(self.rows)
        out = RoutingProbe._stack([self.rows[i] for i in layers]).numpy() if layers else np.zeros((0, 0))
        self.rows.clear()
        return out

    def split(self, per_layer: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(layers, K) -> per image (layers, rows, cols) and per recording (layers, frames)."""
        images, audios, at = [], [], 0
        for s in self.image_spans:
            n = s.rows * s.cols
            images.append(per_layer[:, at : at + n].reshape(-1, s.rows, s.cols))
            at += n
        for s in self.audio_spans:
            audios.append(per_layer[:, at : at + s.frames])
            at += s.frames
        return images, audios


def aggregate(per_layer: np.ndarray, rule: str = "mean", layers: tuple[int, int] | None = None) -> np.ndarray:
    """Reduce a (layers, ...) stack of head-mean maps to one map: mean of [start, end) or max."""
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= per_layer.shape[0]:
            raise ValueError(f"focus layer range {layers} is outside 0..{per_layer.shape[0]}")
        per_layer = per_layer[start:end]
    if rule == "max":
        return per_layer.max(0)
    if rule == "mean":
        return per_layer.mean(0)
    raise ValueError(f"unknown focus aggregation {rule!r}: use 'mean' or 'max'")


# ----------------------------------------------------------------------------- routing


class RoutingProbe:
    MODALITIES = ("text", "image", "audio")

    def __init__(self, routers: list[tuple[int, torch.nn.Module]], num_experts: int, top_k: int,
                 read_route=None):
        """read_route(module, args, output) -> (experts (N, k), weights (N, k), kept (N, k) bool): how to read one
        router's forward; the default is AutoGLMRouter's ``(probs, experts, weights, kept)`` output."""
        self.routers = routers
        self.read_route = read_route or _read_autoglm_route
        self.layer_ids = [i for i, _ in routers]
        self.E, self.k = num_experts, top_k
        L = len(routers)
        self.load = {p: np.zeros((L, num_experts), np.int64) for p in ("prefill", "decode")}
        self.tokens = {"prefill": 0, "decode": 0}
        self.dropped = np.zeros(L, np.int64)
        self.by_modality = {m: np.zeros((L, num_experts), np.int64) for m in self.MODALITIES}
        self.phase = "prefill"
        self.modality: torch.Tensor | None = None  # (N,) 0 text, 1 image, 2 audio for the current forward
        self._step: dict[int, tuple] = {}
        self._handles: list = []

    def __enter__(self) -> "RoutingProbe":
        for slot, (_, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, slot: int):
        def hook(module, args, output):
            experts, weights, kept = self.read_route(module, args, output)
            self._step[slot] = (experts.detach(), weights.detach(), kept.detach())

        return hook

    def collect(self) -> list[tuple[int, list[int], list[float]]]:
        """Fold the last forward into the running counts; return the newest token's route per layer."""
        if not self._step:
            return []
        slots = sorted(self._step)
        experts, weights, kept = (self._stack([self._step[s][i] for s in slots]) for i in range(3))  # (L, N, k)
        weights = weights.float()
        self._step.clear()
        L, n, _ = experts.shape
        e = experts.numpy()
        kept_np = kept.numpy().astype(bool)
        flat = e + (np.asarray(slots)[:, None, None] * self.E)  # expert id per (layer, token, choice)
        counts = np.bincount(flat[kept_np], minlength=self.E * len(self.routers)).reshape(-1, self.E)
        self.load[self.phase] += counts
        self.dropped[slots] += (~kept_np).sum(axis=(1, 2))
        mod = self.modality.numpy() if self.modality is not None and self.modality.numel() == n else None
        if mod is None or not mod.any():
            self.by_modality["text"] += counts
        else:
            for m, name in enumerate(self.MODALITIES):
                sel = (mod == m)[None, :, None] & kept_np
                if sel.any():
                    self.by_modality[name] += np.bincount(flat[sel], minlength=counts.size).reshape(counts.shape)
        self.tokens[self.phase] += n
        last_w = weights[:, -1].numpy().round(5)
        return [(self.layer_ids[s], e[i, -1].tolist(), last_w[i].tolist()) for i, s in enumerate(slots)]

    @staticmethod
    def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        """One host copy for all layers when they share a device (one copy per layer otherwise)."""
        if all(t.device == tensors[0].device for t in tensors):
            return torch.stack(tensors).cpu()
        return torch.stack([t.cpu() for t in tensors])

    def snapshot(self) -> dict:
        total = self.load["prefill"] + self.load["decode"]
        return {
            "layers": self.layer_ids,
            "experts": self.E,
            "top_k": self.k,
            "tokens": dict(self.tokens),
            "prefill": self.load["prefill"].tolist(),
            "decode": self.load["decode"].tolist(),
            "total": total.tolist(),
            "by_modality": {m: v.tolist() for m, v in self.by_modality.items()},
            "dropped": self.dropped.tolist(),
            "cv": balance_cv_rows(total),
            "entropy": balance_entropy_rows(total),
        }


def _read_autoglm_route(module, args, output) -> tuple:
    _, experts, weights, kept = output
    return experts, weights, kept


def balance_cv_rows(load: np.ndarray) -> list[float]:
    """balance_cv of each row of a (layers, experts) load, vectorised."""
    mean = load.mean(axis=1)
    return np.where(mean > 0, load.std(axis=1) / np.maximum(mean, 1e-12), 0.0).tolist()


def balance_entropy_rows(load: np.ndarray) -> list[float]:
    """balance_entropy of each row of a (layers, experts) load, vectorised."""
    if load.shape[1] < 2:
        return [0.0] * load.shape[0]
    total = load.sum(axis=1, keepdims=True)
    p = load / np.maximum(total, 1)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(total[:, 0] > 0, -plogp.sum(axis=1) / math.log(load.shape[1]), 0.0).tolist()


def balance_cv(load: np.ndarray) -> float:
    """Coefficient of variation of per-expert load (0 = perfectly even)."""
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0


def balance_entropy(load: np.ndarray) -> float:
    """Entropy of the load distribution normalised to [0, 1] (1 = perfectly even)."""
    total = load.sum()
    if total <= 0 or len(load) < 2:
        return 0.0
    p = load[load > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(load)))
