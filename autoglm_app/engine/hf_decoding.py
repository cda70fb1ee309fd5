"""``HFBatchDecoder``: continuous batching for the transformers families (GLM-4.1V / AutoGLM-Phone-9B, GLM-4.5V,
Qwen2.5/3-VL, Qwen2.5/3-Omni).

The requests in flight share one forward per token through the model's own text layers over a ``SlotCache``
(``families.hf_batch``): slot i holds the i-th request, the batch stays packed at the front (the worker moves the
last request into a freed slot), and each row keeps its own length, M-RoPE offset, sampler and probes. The focus
rows and the routers' choices of every row come to the host in one copy each per step.

Not compiled: the step runs the model's own eager layers (``--compile`` applies to AutoGLM's static step). Its
gain is the shared forward, one set of kernel launches and one read of the weights for all the rows.
"""

from __future__ import annotations

import torch

from ..families import hf_batch
from .rows import MediaRows, accept_rows, choose_max_batch, greedy_picks, kv_bytes_per_token
from .generation import Generation
from .runtime import Runtime
from .sampling import logprob_rows


class HFBatchDecoder:
    """All the requests in flight in one forward of a transformers family's text model."""

    batched = True
    compiled = False
    warmup_s = 0.0
    variant = "eager, batched (transformers layers)"

    def __init__(self, rt: Runtime, max_batch: int, note: str = ""):
        self.rt = rt
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        self.kv = hf_batch.SlotCache(rt.model, rt.family, self.max_batch, rt.context_limit)
        self.deltas = [0] * self.max_batch  # each slot's M-RoPE offset (its prompt's rope_deltas)
        self.note = note
        self._media_rows = MediaRows(rt.device)

    @property
    def kv_bytes(self) -> int:
        return self.max_batch * self.slot_bytes

    def admit(self, slot: int, gen: Generation) -> None:
        """Copy the request's prefilled cache into ``slot`` (its own cache goes) and keep its prompt's rope offset,
        which the prefill just left on the model."""
        self.kv.load(slot, gen.cache, gen.cache_tokens)
        self.deltas[slot] = hf_batch.rope_delta(self.rt.model, self.rt.family)
        gen.cache = None

    def move(self, src: int, dst: int, gen: Generation) -> None:
        self.kv.move(src, dst, gen.cache_tokens)
        self.deltas[dst] = self.deltas[src]

    @torch.inference_mode()
    def step(self, gens: list[Generation]) -> list:
        """One token for every request (gens[i] in slot i): the finish reasons (None: goes on)."""
        rt, dev, n = self.rt, self.rt.device, len(gens)
        positions = [g.cache_tokens for g in gens]
        keys_seen = max(positions) + 1  # (eager: no shapes to bucket for a compiler, so no key read in vain)
        media, widths = self._media_rows(gens)
        focus = hf_batch.BatchFocus(media) if media is not None else None
        routes = (hf_batch.BatchRoutes(rt.routers, rt.family.read_route)
                  if rt.routers and any(g.routing is not None for g in gens) else None)
        tokens = torch.tensor([g.token for g in gens], dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        rope = torch.tensor([p + d for p, d in zip(positions, self.deltas[:n])], dtype=torch.long, device=dev)
        logits = hf_batch.hf_step(rt.model, rt.family, self.kv, tokens, pos, rope, keys_seen, rt.attention_modules,
                                  focus, routes, plain_causal=n == 1)
        asked = [g.req.options.logprobs for g in gens if g.req.options.logprobs is not None]
        stats = logprob_rows(logits, max(asked)) if asked else [None] * n
        logits = logits.cpu()
        focus_h = focus.take().cpu().numpy() if focus is not None and focus.rows else None
        experts_h = weights_h = None
        if routes is not None and routes.experts:
            experts, weights = routes.take()  # (MoE layers, n, k)
            experts_h = experts.transpose(0, 1).cpu().numpy()
            weights_h = weights.transpose(0, 1).cpu().numpy()
        return accept_rows(gens, logits, stats, greedy_picks(gens, logits, None, stats), focus_h, widths, experts_h,
                           weights_h)
