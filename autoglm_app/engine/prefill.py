"""Several requests' prompts in one forward of the model (AutoGLM with the static decoder).

Requests that arrive together (the worker admits every waiting request that has a free slot between two steps)
would otherwise be prefilled one after another while the batch in flight waits: on the shipped demo model one
prefill of an image and a question took about a quarter of the worker's time with 8 concurrent streams. Here
their prompts are padded on the left into one batch, so each row's own positions are its last and the newest
position of every row is the same column (``logits_to_keep=1`` still holds): positions restart at 0 for each
row, the padding is masked out of attention (``AutoGLMBackbone.build_mask``) and claims no expert capacity
(``AutoGLMRouter.forward``: capacity is per sequence), so a request gets the tokens it would get alone, up to
float rounding in the batched matrix products (the same caveat as the batched decode step). Each request's
probes see only its own row (``RowProbes``). A prompt with audio, or with images of another size, is prefilled
alone (its features would need padding of their own).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import DynamicCache

from .generation import Generation

BATCHED_KEYS = {"input_ids", "attention_mask", "pixel_values"}


def batch_key(inputs: dict) -> tuple | None:
    """What prompts must share to go in one batch (the image size), or None for a prompt prefilled alone."""
    if not set(inputs) <= BATCHED_KEYS:
        return None
    pixels = inputs.get("pixel_values")
    return ("pixels", tuple(pixels.shape[1:]), pixels.dtype) if pixels is not None else ("text",)


def pad_left(rows: list[dict], pad_id: int) -> dict:
    """The rows' inputs (each batch 1) as one left-padded batch: input_ids, attention_mask, position_ids (each row
    counting from 0 at its first real token) and every row's images in row order (how ``embed`` places them)."""
    T = max(int(r["input_ids"].shape[1]) for r in rows)
    ids = rows[0]["input_ids"]
    input_ids = torch.full((len(rows), T), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=ids.device)
    for i, r in enumerate(rows):
        n = int(r["input_ids"].shape[1])
        input_ids[i, T - n:] = r["input_ids"][0]
        mask[i, T - n:] = 1
    out = {"input_ids": input_ids, "attention_mask": mask,
           "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    pixels = [r["pixel_values"] for r in rows if r.get("pixel_values") is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


class RowProbes(contextlib.AbstractContextManager):
    """Each request's probes over its own row of a batched prefill: its RoutingProbe keeps the router outputs of its
    row's tokens (``tokens_of``); one hook per attention module hands each FocusProbe its row with the padding cut
    off, shaped as its own batch-1 forward would have given it (queries, keys, mask or probabilities)."""

    def __init__(self, rt, gens: list[Generation], T: int):
        self.modules = rt.attention_modules
        self.rows = [(i, g, T - g.cache_tokens) for i, g in enumerate(gens)]
        self.T = T
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "RowProbes":
        for i, g, start in self.rows:
            if g.routing is not None:
                g.routing.tokens_of = slice(i * self.T + start, (i + 1) * self.T)
                self._stack.enter_context(g.routing)
        if any(g.focus is not None for _, g, _ in self.rows):
            for m in self.modules:
                m.focus_probe = self._focus
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        for _, g, _ in self.rows:
            if g.routing is not None:
                g.routing.tokens_of = None
        for m in self.modules:
            m.focus_probe = None

    def _focus(self, layer: int, q, k, mask, probs, n_mem: int) -> None:
        # no cache before a prefill and no memory slots (the static decoder serves no model with them): key j is
        # query j, so a row's own keys start where its queries do
        for i, g, start in self.rows:
            if g.focus is not None:
                m = mask[i : i + 1, :, start:, start:] if mask is not None else None
                p = probs[i : i + 1, :, start:, start:] if probs is not None else None
                g.focus(layer, q[i : i + 1, :, start:], k[i : i + 1, :, start:], m, p, n_mem)


@torch.inference_mode()
def prefill_batch(rt, gens: list[Generation], inputs: list[dict]) -> list[tuple[int, object]]:
    """One forward for the prompts ``inputs[i]`` of ``gens[i]`` (all with the same ``batch_key``; each already
    ``prepare``d): each request's cache is its row of the batch's cache (``cache_row``) -> each request's first
    token and memory (None: the static decoder serves no model with memory slots)."""
    batch = pad_left(inputs, getattr(rt.model.config, "pad_token_id", None) or 0)
    T = int(batch["input_ids"].shape[1])
    cache = DynamicCache()
    rt.family.begin(rt.model)
    with RowProbes(rt, gens, T):
        out = rt.model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1,
                       **rt.family.forward_kwargs(None))
    firsts = []
    for i, g in enumerate(gens):
        g.cache, g.cache_row = cache, i
        firsts.append((g.sampler.pick(out.logits[i, -1]), None))
    return firsts
