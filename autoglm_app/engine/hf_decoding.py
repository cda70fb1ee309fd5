"""``HFBatchDecoder``: continuous batching for the transformers families (GLM-4.1V / AutoGLM-Phone-9B, GLM-4.5V,
Qwen2.5/3-VL, Qwen2.5/3-Omni).

The requests in flight share one forward per token through the model's own text layers over a ``SlotCache``
(``families.hf_batch``): slot i holds the i-th request, the batch stays packed at the front (the worker moves the
last request into a freed slot), and each row keeps its own length, M-RoPE offset, sampler and probes. The focus
rows and the routers' choices of every row come to the host in one copy each per step.

The step is the model's own layers, eager or (``--compile``) through torch.compile with the focus rows and routes
inside the graph; warm-up times both at one row and at ``max_batch`` rows and keeps the faster for each (on this
CPU the compiled graph won alone by 1.3x; at 8 rows one run timed it 1.1x faster, another run's 8 concurrent
requests were slower with it). Its gain under load
is the shared forward, one set of kernel launches and one read of the weights for all the rows; alone, the compiled
graph's fewer launches.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..families import hf_batch
from .rows import KEYS_BUCKET, MediaRows, accept_rows, choose_max_batch, greedy_picks, kv_bytes_per_token
from .generation import Generation
from .runtime import Runtime
from .sampling import logprob_rows

log = logging.getLogger(__name__)


class HFBatchDecoder:
    """All the requests in flight in one forward of a transformers family's text model."""

    batched = True
    batched_prefill = False  # (each request's prefill goes through the model's own forward, alone)
    pad_one = False

    def __init__(self, rt: Runtime, max_batch: int, note: str = "", compile_mode: str = "off", progress=None):
        self.rt = rt
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        self.kv = hf_batch.SlotCache(rt.model, rt.family, self.max_batch, rt.context_limit)
        self.deltas = [0] * self.max_batch  # each slot's M-RoPE offset (its prompt's rope_deltas)
        self.note = note
        self._media_rows = MediaRows(rt.device)
        self.compiled, self.warmup_s, self.timings, self.variant = False, 0.0, {}, "eager"
        self.variant_rows = "eager"  # the form for a step of two rows or more (``variant``: for one row)
        self._forms: dict = {"eager": self._eager}
        self._hooked = False  # the compiled form's hooks on the routers now
        self._routes = None  # the compiled form's routes: its hooks on the routers while that form runs (_hook)
        if compile_mode != "off":
            self._compile(progress)

    @property
    def kv_bytes(self) -> int:
        return self.max_batch * self.slot_bytes

    # ------------------------------------------------------------------ the step's forms
    def _eager(self, tokens, pos, rope, keys_seen, media, gens):
        """The model's own eager layers; focus and routes only when a row asks. A lone row reads exactly its keys
        with no mask of our own (sdpa's causal fast path)."""
        rt = self.rt
        focus = hf_batch.BatchFocus(media) if media is not None else None
        routes = (hf_batch.BatchRoutes(rt.routers, rt.family.read_route)
                  if rt.routers and gens is not None and any(g.routing is not None for g in gens) else None)
        logits = hf_batch.hf_step(rt.model, rt.family, self.kv, tokens, pos, rope, keys_seen, rt.attention_modules,
                                  focus, routes, plain_causal=tokens.shape[0] == 1)
        experts, weights = routes.take() if routes is not None and routes.experts else (None, None)
        return logits, (focus.take() if focus is not None and focus.rows else None), experts, weights

    def _compile(self, progress) -> None:
        """torch.compile of the step with its telemetry (``hf_step_telemetry``: the focus rows and routes always
        computed, in the same graph), dynamic sizes (rows, cache length, media keys), warmed up on the shapes
        requests bring and timed against the eager step; the faster is kept. On a GPU, CUDA graphs (mode
        ``reduce-overhead``). Any failure leaves the eager step, with the reason in the log."""
        rt = self.rt
        t0 = time.perf_counter()
        if progress is not None:
            progress.stage("compiling the decode step (torch.compile)")
        cuda = rt.device.type == "cuda"
        try:
            fn = torch.compile(hf_batch.hf_step_telemetry, mode="reduce-overhead" if cuda else None, dynamic=True)
            self._routes = hf_batch.BatchRoutes(rt.routers, rt.family.read_route) if rt.routers else None

            def compiled(tokens, pos, rope, keys_seen, media, gens):
                if self._routes is not None:
                    self._routes.clear()  # (what the model's own forwards, a prefill, left there)
                if media is None:  # a row without media reads key 0 (two keys: a size of 1 would be its own graph)
                    media = torch.zeros(tokens.shape[0], 2, dtype=torch.long, device=tokens.device)
                out = fn(rt.model, rt.family, self.kv, tokens, pos, rope, keys_seen, rt.attention_modules, media,
                         self._routes)
                if self._routes is not None:
                    self._routes.clear()
                return out

            forms = {"eager": self._eager, "compiled": compiled}
            self._forms = forms
            self.timings = self._measure(forms)
        except Exception as e:
            log.warning("the decode step could not be compiled (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            self.note = f"{self.note}; compile failed: {type(e).__name__}"
            if self._routes is not None:
                self._routes.__exit__()
            self._routes, self._hooked, self._forms = None, False, {"eager": self._eager}
            return
        faster = lambda suffix: min(forms, key=lambda f: self.timings.get(f + suffix, math.inf))  # noqa: E731
        self.use(faster(""), faster(f", {self.max_batch} rows") if self.max_batch > 1 else None)
        self.warmup_s = time.perf_counter() - t0
        log.info("decode step: %s -> %s, compile and warm-up %.1f s",
                 ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings.items()), self.step_name, self.warmup_s)

    def use(self, variant: str, rows_variant: str | None = None) -> None:
        """Decode one row with ``variant`` ("eager" or "compiled") and two or more with ``rows_variant`` (default: the
        same): the faster at warm-up, or the one a test asks for."""
        self.variant, self.variant_rows = variant, rows_variant or variant
        self.compiled = "compiled" in (self.variant, self.variant_rows)
        self._hook(variant == "compiled")

    @property
    def step_name(self) -> str:
        if self.variant == self.variant_rows or self.max_batch == 1:
            return self.variant
        return f"{self.variant} for one row, {self.variant_rows} for more"

    def _hook(self, on: bool) -> None:
        """The compiled graph's hooks are on the routers only while that form runs (an eager step has its own)."""
        if self._routes is not None and on != self._hooked:
            self._routes.attach() if on else self._routes.__exit__()
            self._hooked = on

    def _keys(self, positions: list[int], compiled: bool) -> int:
        """Cache positions the step reads: exactly the longest row's, or (compiled) in multiples of KEYS_BUCKET,
        so CUDA graphs see few shapes."""
        need = max(positions) + 1
        return min(self.kv.capacity, math.ceil(need / KEYS_BUCKET) * KEYS_BUCKET) if compiled else need

    @torch.inference_mode()
    def _measure(self, forms: dict) -> dict:
        """Each form warmed up on four shapes (so the dynamic sizes are traced before any request), then timed at
        one row (15 calls) and at ``max_batch`` rows (7), one call of each form after the other (a drifting machine
        slows both alike): median ms, keyed "eager", "compiled", "eager, 8 rows", ..."""
        dev = self.rt.device

        def call(name, rows, keys, width):
            run = forms[name]
            self._hook(name == "compiled")
            if name == "compiled":
                keys = min(self.kv.capacity, KEYS_BUCKET * math.ceil(keys / KEYS_BUCKET))
            pos = torch.full((rows,), keys - 1, dtype=torch.long, device=dev)
            # (rope positions not the same tensor as positions: an alias is a guard, which requests would fail)
            run(torch.zeros(rows, dtype=torch.long, device=dev), pos, pos.clone(), keys,
                torch.zeros(rows, width, dtype=torch.long, device=dev), None)

        for name in forms:
            for rows, keys, width in ((1, 24, 4), (1, 40, 9), (2, 40, 9), (3, 56, 17)):
                call(name, min(rows, self.max_batch), min(keys, self.kv.capacity), width)
        times: dict[str, list[float]] = {}
        keys = min(KEYS_BUCKET, self.kv.capacity)
        for rows, calls in ((1, 15), (self.max_batch, 7)) if self.max_batch > 1 else ((1, 15),):
            for _ in range(calls):
                for name in forms:
                    start = time.perf_counter()
                    call(name, rows, keys, 4)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    times.setdefault(name if rows == 1 else f"{name}, {rows} rows", []).append(
                        1000 * (time.perf_counter() - start))
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    # ------------------------------------------------------------------ slots
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
        dev, n = self.rt.device, len(gens)
        positions = [g.cache_tokens for g in gens]
        media, widths = self._media_rows(gens)
        tokens = torch.tensor([g.token for g in gens], dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        rope = torch.tensor([p + d for p, d in zip(positions, self.deltas[:n])], dtype=torch.long, device=dev)
        form = self.variant if n == 1 else self.variant_rows
        self._hook(form == "compiled")
        logits, focus, experts, weights = self._forms[form](tokens, pos, rope, self._keys(positions, form == "compiled"),
                                                            media, gens)
        asked = [g.req.options.logprobs for g in gens if g.req.options.logprobs is not None]
        stats = logprob_rows(logits, max(asked)) if asked else [None] * n
        logits = logits.cpu()
        focus_h = focus.cpu().numpy() if focus is not None and media is not None else None
        experts_h = weights_h = None
        if experts is not None:  # (MoE layers, n, k) -> (n, MoE layers, k)
            experts_h = experts.transpose(0, 1).cpu().numpy()
            weights_h = weights.transpose(0, 1).cpu().numpy()
        return accept_rows(gens, logits, stats, greedy_picks(gens, logits, None, stats), focus_h, widths, experts_h,
                           weights_h)
