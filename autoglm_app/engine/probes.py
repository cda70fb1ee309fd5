"""Probes that plug into a forward pass without changing its shape.

FocusProbe: for the newest query of each forward (the position whose output picks the
next token) it computes that one attention row per head against all keys, in float32,
and keeps only the entries of image / audio key positions. The attention itself keeps
running on the fast kernel (SDPA); under eager attention the probe reads the
probabilities the layer already computed instead.

RoutingProbe: forward hooks on the router modules record, for every routed token,
the chosen experts and gate weights; it keeps running load per layer and expert,
split by prefill / decode, by the modality of the token and (decode) by its phase, the load of
the last 10 / 100 / 1,000 routed tokens (a ring of the last 1,000 tokens' choices), and the
prompt tokens' own top-k experts (int16, the prompt's tokens only) for routed-experts exports.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..events import ROUTING_WINDOWS, ExpertCounts
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
        # when the spans are back to back (one image, or media placed together) a slice replaces the gather
        n = self.positions.numel()
        self._contiguous = bool(n) and int(self.positions[-1] - self.positions[0]) == n - 1
        # (rows, cols) per image and frames per recording, in key order (what Focus cuts its row into)
        self.shapes = ([(s.rows, s.cols) for s in image_spans], [s.frames for s in audio_spans])
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
        """Called inside each attention layer: keep references only; ``take`` does the arithmetic
        for all layers at once after the forward (one batched computation per token instead of
        one per layer)."""
        if self.positions.numel() == 0:
            return
        if probs is not None:  # eager attention computed the full rows already
            self.mode = "eager"
            self.rows[layer] = ("probs", probs[0, :, -1, :], n_mem)
        else:
            m = mask[0, 0, -1] if mask is not None else None
            self.rows[layer] = ("qk", q[0, :, -1, :], k[0], m, n_mem)

    def _key_index(self, device, n_mem: int) -> torch.Tensor:
        keys = self._keys.get((device, n_mem))
        if keys is None:
            keys = self._keys[(device, n_mem)] = self.positions.to(device) + n_mem
        return keys

    def take(self) -> np.ndarray:
        """(layers, K) head-mean attention of the newest query on the image/audio keys, for the
        layers recorded during the last forward, then cleared."""
        if not self.rows:
            return np.zeros((0, 0))
        layers = sorted(self.rows)
        # layers that share device, key length and head layout are computed as one batch
        groups: dict[tuple, list[int]] = {}
        for i in layers:
            r = self.rows[i]
            if r[0] == "probs":
                key = ("probs", r[1].device, tuple(r[1].shape), r[2])
            else:
                key = ("qk", r[2].device, tuple(r[1].shape), tuple(r[2].shape), r[3] is None, r[4])
            groups.setdefault(key, []).append(i)
        out: dict[int, torch.Tensor] = {}
        for key, ids in groups.items():
            recs = [self.rows[i] for i in ids]
            if key[0] == "probs":
                row = torch.stack([r[1] for r in recs]).float()  # (L, H, S)
                n_mem = key[3]
            else:
                q = torch.stack([r[1] for r in recs]).float()  # (L, H, D)
                k = torch.stack([r[2] for r in recs]).float()  # (L, Hkv, S, D)
                L, H, D = q.shape
                hkv = k.shape[1]
                S = k.shape[2]
                scores = torch.baddbmm(q.new_empty(()), q.view(L * hkv, H // hkv, D),
                                       k.view(L * hkv, S, D).transpose(1, 2), beta=0.0, alpha=D**-0.5)
                scores = scores.view(L, hkv, H // hkv, S)
                if recs[0][3] is not None:
                    allowed = torch.stack([r[3] for r in recs]).to(scores.device)  # (L, S)
                    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
                row = scores.softmax(-1).view(L, H, -1)
                n_mem = key[5]
            head_mean = row.mean(1)  # (L, S)
            if self._contiguous:
                start = int(self.positions[0]) + n_mem
                picked = head_mean[:, start : start + self.positions.numel()]  # (L, K)
            else:
                picked = head_mean.index_select(1, self._key_index(row.device, n_mem))
            if len(groups) == 1:  # the usual case: one batch, already in layer order
                self.rows.clear()
                return picked.cpu().numpy()
            for j, i in enumerate(ids):
                out[i] = picked[j]
        self.rows.clear()
        return host_stack([out[i] for i in layers]).numpy()


# ----------------------------------------------------------------------------- routing


class RoutingProbe:
    MODALITIES = ("text", "image", "audio")
    PHASES = ("reasoning", "answer")
    COUNT_ROWS = ("prefill", "decode") + MODALITIES + PHASES
    # a batched step's tokens wait to be counted until the counts are read (each delivery of events) or this many
    # are waiting: one bincount per count for the group, not six indexed updates a token (measured on the demo
    # model: 42 us a token folded one by one)
    PENDING_MAX = 64

    def __init__(self, routers: list[tuple[int, torch.nn.Module]], num_experts: int, top_k: int,
                 read_route: Callable[..., tuple]):
        """read_route(module, args, output) -> (experts (N, k), weights (N, k), kept (N, k) bool): how to read one
        router's forward (the family's ``read_route``)."""
        self.routers = routers
        self.read_route = read_route
        self.layer_ids = [i for i, _ in routers]
        self.E, self.k = num_experts, top_k
        L = len(routers)
        # every count lives in one int64 buffer (rows: the COUNT_ROWS loads, then one per routing window, then the
        # dropped choices), so a snapshot (counts(), at most every 50 ms of deliveries) is one copy, not a dozen, and a
        # group of decode tokens is added to all the rows it feeds in one indexed add; each row has L * E cells
        # (layer * E + expert) and a spare one: a choice not counted (dropped, or a layer that did not route) goes
        # to the spare column, which no figure reads
        self._spare = L * num_experts
        cells = self._spare + 1
        self._buf = np.zeros((len(self.COUNT_ROWS) + len(ROUTING_WINDOWS) + 1, cells), np.int64)
        row = {name: self._buf[i, : self._spare].reshape(L, num_experts) for i, name in enumerate(self.COUNT_ROWS)}
        self.load = {p: row[p] for p in ("prefill", "decode")}  # views into _buf: in-place updates write it
        self.by_modality = {m: row[m] for m in self.MODALITIES}
        self.by_phase = {p: row[p] for p in self.PHASES}
        self._win_at = len(self.COUNT_ROWS)
        self._win = self._buf[self._win_at : self._win_at + len(ROUTING_WINDOWS)]  # load per window (spare kept)
        self.dropped = self._buf[-1, :L]
        self.tokens = {"prefill": 0, "decode": 0}
        self.phase_tokens = {p: 0 for p in self.PHASES}
        self.token_phase = "answer"  # the phase of the token a decode step routes (start_decode)
        # the last max(ROUTING_WINDOWS) routed tokens' flat expert ids
        # (a few rows more than the largest window: the decode steps' tokens are counted in groups, PENDING_MAX at
        # most, and a group's leaving tokens must still be in the ring when it is counted)
        self._ring = np.full((max(ROUTING_WINDOWS) + self.PENDING_MAX, L * top_k), self._spare, np.int64)
        self._pending: list[tuple[int, str]] = []  # decode steps not yet counted: (their ring row, phase)
        self._seen = 0  # routed tokens so far (prefill and decode)
        self._sizes = np.asarray(ROUTING_WINDOWS)
        self._win_rows = np.arange(len(ROUTING_WINDOWS))[:, None]
        # the rows a decode token adds to: decode, text, its phase and every window
        wins = list(range(self._win_at, self._win_at + len(ROUTING_WINDOWS)))
        self._decode_rows = {p: np.asarray([self.COUNT_ROWS.index(r) for r in ("decode", "text", p)] + wins)
                             for p in self.PHASES}
        self.prompt_experts: np.ndarray | None = None  # (prompt tokens, L, k) int16
        self.phase = "prefill"
        self.modality: torch.Tensor | None = None  # (N,) 0 text, 1 image, 2 audio for the current forward
        self._step: dict[int, tuple] = {}
        self.tokens_of: slice | None = None  # in a batched prefill's forward, this request's flat token positions
        self._offsets = (np.arange(L) * num_experts)[:, None, None]
        self._flat_offsets = np.repeat(np.arange(L) * num_experts, top_k)  # (L * k,) for a token's (L, k) experts
        self._all_slots = list(range(L))
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
            route = self.read_route(module, args, output)  # (runs under inference_mode: no graph)
            self._step[slot] = route if self.tokens_of is None else tuple(t[self.tokens_of] for t in route)

        return hook

    def collect(self) -> list[tuple[int, list[int], list[float]]]:
        """Fold the last forward (what the hooks read) into the running counts; return the newest token's route
        per layer."""
        if not self._step:
            return []
        slots = sorted(self._step)
        experts, weights, kept = (host_stack([self._step[s][i] for s in slots]) for i in range(3))  # (L, N, k)
        self._step.clear()
        return self._fold(slots, experts.numpy(), weights.float().numpy(), kept.numpy().astype(bool, copy=False))

    def fold_step(self, experts: np.ndarray, weights: np.ndarray) -> None:
        """One decode step's route as a batched step returned it (experts, weights: (MoE layers, k), every
        router ran and nothing was dropped), folded into the counts like ``collect``'s."""
        if self.phase != "decode":
            e3 = np.asarray(experts, np.int64)[:, None, :]
            self._fold(self._all_slots, e3, np.asarray(weights)[:, None, :], np.ones(e3.shape, bool))
            return
        # the decode step's one token, every layer routed, nothing dropped: its L * k flat ids go into the ring now
        # (one add, written in place) and into the counts with the others waiting, when the counts are next read
        at = self._seen % self._ring.shape[0]
        np.add(np.asarray(experts).reshape(-1), self._flat_offsets, out=self._ring[at], casting="unsafe")
        self._seen += 1
        self._pending.append((at, self.token_phase))
        self.phase_tokens[self.token_phase] += 1
        self.tokens["decode"] += 1
        if len(self._pending) >= self.PENDING_MAX:
            self._settle()

    def _settle(self) -> None:
        """Count the decode steps' tokens that wait (``fold_step``): the load, text and phase counts by one
        bincount each, and each window's tokens in and out (the ones leaving are still in the ring: it has
        PENDING_MAX rows to spare)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = self._ring[[at for at, _ in pending]]  # (m, L * k) their flat ids, in the ring since fold_step
        size, cells = self._ring.shape[0], self._spare + 1
        phases = [phase for _, phase in pending]
        if len(set(phases)) == 1:  # decode, text, the phase and every window in one indexed add
            self._buf[self._decode_rows[phases[0]]] += np.bincount(rows.ravel(), minlength=cells)
        else:
            for phase in set(phases):
                mine = rows[[p == phase for p in phases]]
                self._buf[self._decode_rows[phase]] += np.bincount(mine.ravel(), minlength=cells)
        # each window: the token each one pushed out (w before it) out, all windows in one count
        left = np.arange(self._seen - len(pending), self._seen)[None, :] - self._sizes[:, None]  # (windows, m)
        valid = left >= 0
        if valid.any():
            window = np.broadcast_to(self._win_rows, left.shape)[valid]
            out = self._ring[left[valid] % size] + (window * cells)[:, None]
            self._win -= np.bincount(out.ravel(), minlength=self._win.size).reshape(self._win.shape)

    def _fold(self, slots: list[int], e: np.ndarray, weights: np.ndarray, kept_np: np.ndarray):
        """experts, weights, kept (layers run, N tokens, k) on the host -> the counts; the newest token's route."""
        self._settle()  # the ring and the windows in token order
        n = e.shape[1]
        if len(slots) == len(self.routers):  # every router ran (always, for a full forward)
            offsets = self._offsets
        else:
            offsets = np.asarray(slots)[:, None, None] * self.E
        flat = e + offsets  # expert id per (layer, token, choice)
        all_kept = kept_np.all()
        counts = np.bincount(flat.ravel() if all_kept else flat[kept_np],
                             minlength=self.E * len(self.routers)).reshape(-1, self.E)
        self.load[self.phase] += counts
        if not all_kept:
            self.dropped[slots] += (~kept_np).sum(axis=(1, 2))
        mod = self.modality  # None: every token is text (decode steps)
        if mod is None or mod.numel() != n or not bool(mod.any()):
            self.by_modality["text"] += counts
        else:
            mod = mod.numpy()
            for m, name in enumerate(self.MODALITIES):
                sel = (mod == m)[None, :, None] & kept_np
                if sel.any():
                    self.by_modality[name] += np.bincount(flat[sel], minlength=counts.size).reshape(counts.shape)
        if self.phase == "decode":
            self.by_phase[self.token_phase] += counts
            self.phase_tokens[self.token_phase] += n
        self._record(np.where(kept_np, flat, -1) if not all_kept else flat, slots, e)
        self.tokens[self.phase] += n
        last_e = e[:, -1].tolist()
        last_w = weights[:, -1].tolist()
        return [(self.layer_ids[s], last_e[i], last_w[i]) for i, s in enumerate(slots)]

    def _record(self, flat: np.ndarray, slots: list[int], experts: np.ndarray) -> None:
        """Slide the windows over this forward's tokens (flat ids (layers run, N, k), -1 = dropped), and keep
        the prompt's experts when it is the prefill."""
        L, k, n = len(self.routers), self.k, flat.shape[1]
        if len(slots) != L:  # a layer that did not route: -1 in its columns
            full = np.full((L, n, k), -1, np.int64)
            full[slots] = flat
            flat = full
            ids = np.full((L, n, k), -1, np.int64)
            ids[slots] = experts
            experts = ids
        if self.phase == "prefill":
            mine = experts.transpose(1, 0, 2).astype(np.int16 if self.E <= 32767 else np.int32)
            self.prompt_experts = mine if self.prompt_experts is None else np.concatenate([self.prompt_experts, mine])
        rows = flat.transpose(1, 0, 2).reshape(n, L * k)
        rows = np.where(rows < 0, self._spare, rows)
        size = self._ring.shape[0]
        if n == 1:  # a decode step
            self._slide(rows[0])
            return
        keep = rows[-size:]  # several tokens (the prefill): write them, then count each window afresh
        self._ring[np.arange(self._seen + n - len(keep), self._seen + n) % size] = keep
        self._seen += n
        for i, w in enumerate(ROUTING_WINDOWS):
            last = self._ring[np.arange(self._seen - min(w, self._seen), self._seen) % size].ravel()
            self._win[i] = np.bincount(last, minlength=self._win.shape[1])

    def _slide(self, row: np.ndarray) -> None:
        """One token's flat ids (L * k) into each window, and the token that left each window out."""
        # a token's ids are distinct (top-k per layer, layers offset by E) but for the spare column
        self._win[:, row] += 1
        size = self._ring.shape[0]
        old = self._ring[(self._seen - self._sizes) % size]  # (windows, L * k): the tokens leaving
        old[self._seen < self._sizes] = self._spare  # a window not yet full loses nothing
        self._win[self._win_rows, old] -= 1
        self._ring[self._seen % size] = row
        self._seen += 1

    def start_decode(self, phase: str = "answer") -> None:
        """From here on the forwards are decode steps, and their one token each is text; ``phase`` is the
        phase ("reasoning" / "answer") of the token the next step routes (the one just emitted)."""
        self.phase = "decode"
        self.modality = None
        self.token_phase = phase if phase in self.PHASES else "answer"

    def counts(self) -> ExpertCounts:
        """Copies of the running counts as of now (the event's data; ``events.expert_load`` builds the dict)."""
        self._settle()
        snap = self._buf.copy()  # one copy; the fields are views of it
        L, E = len(self.routers), self.E
        loads = snap[: self._win_at, : self._spare].reshape(-1, L, E)
        row = dict(zip(self.COUNT_ROWS, loads))
        windows = snap[self._win_at : -1, : self._spare].reshape(-1, L, E)
        return ExpertCounts(
            layers=self.layer_ids, experts=E, top_k=self.k, tokens=dict(self.tokens),
            prefill=row["prefill"], decode=row["decode"], by_modality={m: row[m] for m in self.MODALITIES},
            dropped=snap[-1, :L], windows=dict(zip(ROUTING_WINDOWS, windows)),
            window_tokens={w: min(w, self._seen) for w in ROUTING_WINDOWS},
            by_phase={p: row[p] for p in self.PHASES}, phase_tokens=dict(self.phase_tokens),
            prompt_experts=self.prompt_experts,
        )


def host_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack on the host: one copy for all layers when they share a device (one copy per layer otherwise)."""
    if all(t.device == tensors[0].device for t in tensors):
        return torch.stack(tensors).cpu()
    return torch.stack([t.cpu() for t in tensors])
