"""How the worker advances every admitted request by one token: the decoders.

``StaticDecoder`` (AutoGLM): one batched step over a static KV cache (``modeling.static_decode``) for
all the requests in flight; slot i holds the i-th request, and the batch stays packed at the front
(a request that ends hands its slot to the last one). The step returns the logits and, for the rows
that asked, the focus rows and routed experts; they come to the host in one copy per step (plus the
logits), each row is sampled with its own request's sampler, and the telemetry is handed to that
request. The step can be compiled (``--compile``): ``torch.compile`` with inductor (its C++ wrapper on
the CPU; CUDA graphs on a GPU, mode ``reduce-overhead``), warmed up on the shapes it will see while
the model loads.

``RequestDecoder`` (any other model: the transformers families, AutoGLM with memory slots): each
request keeps its own DynamicCache and goes through the model's own forward with its hook probes,
one after the other within a step, so requests still interleave token by token.

Both share the slot arithmetic: a slot holds one request of up to the context limit, and
``max_batch`` slots exist (``choose_max_batch`` from the memory there is when it is not given).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from .generation import Generation
from .runtime import Runtime

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")
DEFAULT_MAX_BATCH = 8  # the most slots chosen automatically
KEYS_BUCKET = 128  # the step reads the cache in multiples of this many positions (fewer shapes to compile)


def choose_max_batch(slot_bytes: int, device: torch.device, requested: int) -> int:
    """``requested`` when given (> 0); else up to DEFAULT_MAX_BATCH slots in a quarter of the memory the device
    has free (a GPU: what the allocator reports free after the load; the CPU: what the OS reports available),
    never fewer than 1."""
    if requested > 0:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, min(DEFAULT_MAX_BATCH, int(free * 0.25 // max(slot_bytes, 1))))


class RequestDecoder:
    """Each request its own cache and forward (the model's own), one after the other within a step."""

    batched = False
    compiled = False
    warmup_s = 0.0
    note = ""

    def __init__(self, rt: Runtime, max_batch: int, why: str = ""):
        self.rt = rt
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        self.note = why

    def admit(self, slot: int, gen: Generation) -> None:
        """The request keeps the cache its prefill filled."""

    def move(self, src: int, dst: int, gen: Generation) -> None:
        """Nothing to move: each request's cache is its own."""

    def step(self, gens: list[Generation]) -> list[str | None]:
        """Each request one token through its own forward: the finish reasons (None: goes on)."""
        out = []
        for g in gens:
            try:
                out.append(g.forward_one())
            except Exception as e:  # a failure stays with its request
                out.append(e)
        return out


def kv_bytes_per_token(model) -> int:
    """Keys and values of one position in every layer (from the text config), in the activations' dtype."""
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype
    return 2 * cfg.num_hidden_layers * heads * head_dim * dtype.itemsize


class StaticDecoder:
    """All the requests in flight in one step over a static KV cache (AutoGLM)."""

    batched = True

    def __init__(self, rt: Runtime, max_batch: int, compile_mode: str = "off", progress=None):
        from ..modeling import static_decode as sd

        self.rt, self.sd = rt, sd
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        self.kv = sd.StaticKV(rt.model, self.max_batch, rt.context_limit)
        self.attend, self.head, self.experts = sd.attend_step, sd.head_step, sd.experts_dispatch
        self.compiled, self.warmup_s, self.note = False, 0.0, ""
        if compile_mode != "off":
            self._compile(progress)

    # ------------------------------------------------------------------ compile
    def _compile(self, progress) -> None:
        """Compile the step's two parts and run them on the shapes requests will bring (1 and 2 rows, two
        cache lengths, probes on and off), so the first request does not wait; any failure leaves the
        eager step, with the reason in the log."""
        import torch._inductor.config as inductor

        t0 = time.perf_counter()
        if progress is not None:
            progress.stage("compiling the decode step (torch.compile)")
        cuda = self.rt.device.type == "cuda"
        try:
            if not cuda:
                inductor.cpp_wrapper = True  # the generated code calls its kernels from C++, not Python
            mode = "reduce-overhead" if cuda else None
            attend = torch.compile(self.sd.attend_step, mode=mode, dynamic=None)
            head = torch.compile(self.sd.head_step, mode=mode, dynamic=None)
            self._warm(attend, head)
        except Exception as e:
            log.warning("the decode step could not be compiled (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            self.note = f"compile failed: {type(e).__name__}"
            return
        finally:
            if not cuda:
                inductor.cpp_wrapper = False
        self.attend, self.head, self.compiled = attend, head, True
        self.warmup_s = time.perf_counter() - t0
        log.info("decode step compiled and warmed up in %.1f s", self.warmup_s)

    @torch.inference_mode()
    def _warm(self, attend, head) -> None:
        dev = self.rt.device
        media = torch.zeros(1, 4, dtype=torch.long, device=dev)
        for rows, keys in ((1, KEYS_BUCKET), (2, 2 * KEYS_BUCKET)):
            if rows > self.max_batch or keys > self.kv.capacity:
                continue
            tokens = torch.zeros(rows, dtype=torch.long, device=dev)
            positions = torch.full((rows,), keys - 1, dtype=torch.long, device=dev)
            for probes in (False, True):
                self.sd.decode_step(self.rt.model, self.kv, tokens, positions, keys,
                                    media.expand(rows, -1) if probes else None, probes, attend, head, self.experts)

    # ------------------------------------------------------------------ slots
    def admit(self, slot: int, gen: Generation) -> None:
        """Copy the request's prefilled cache into ``slot``; the request's own cache goes."""
        self.kv.load(slot, gen.cache, gen.cache_tokens)
        gen.cache = None

    def move(self, src: int, dst: int, gen: Generation) -> None:
        self.kv.move(src, dst, gen.cache_tokens)

    @torch.inference_mode()
    def step(self, gens: list[Generation]) -> list[str | None]:
        """One token for every request (gens[i] in slot i): the finish reasons (None: goes on)."""
        dev = self.rt.device
        n = len(gens)
        positions = [g.cache_tokens for g in gens]
        keys_seen = min(self.kv.capacity, math.ceil((max(positions) + 1) / KEYS_BUCKET) * KEYS_BUCKET)
        media_rows = [g.media_keys for g in gens]
        want = [g.focus is not None or g.routing is not None for g in gens]
        probes = any(want)
        media = None
        widths = [0 if m is None else m.numel() for m in media_rows]
        if probes and max(widths):
            pad = max(widths)
            media = torch.zeros(n, pad, dtype=torch.long)
            for i, m in enumerate(media_rows):
                if m is not None and m.numel():
                    media[i, : m.numel()] = m
                    media[i, m.numel():] = m[0]
            media = media.to(dev)
        tokens = torch.tensor([g.token for g in gens], dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        logits, focus, experts, weights = self.sd.decode_step(self.rt.model, self.kv, tokens, pos, keys_seen, media,
                                                              probes, self.attend, self.head, self.experts)
        logits = logits.cpu()
        focus_h, experts_h, weights_h = _to_host(focus, experts, weights)
        now = time.perf_counter()
        out = []
        for i, g in enumerate(gens):
            g.cache_tokens += 1
            try:
                token = g.sampler.pick(logits[i])
                f = focus_h[i, :, : widths[i]] if focus_h is not None and g.focus is not None and widths[i] else None
                r = (experts_h[i], weights_h[i]) if experts_h is not None and g.routing is not None else None
                out.append(g.accept(token, now, f, r))
            except Exception as e:  # a failure stays with its request
                out.append(e)
        return out


def _to_host(focus, experts, weights) -> tuple:
    """The step's telemetry in one device-to-host copy: (focus (n, L, K), experts (n, Lm, k) int, weights) numpy."""
    parts = [t for t in (focus, experts, weights) if t is not None]
    if not parts:
        return None, None, None
    flat = torch.cat([t.float().reshape(t.shape[0], -1) for t in parts], 1).cpu().numpy()
    out, at = [], 0
    for t in (focus, experts, weights):
        if t is None:
            out.append(None)
            continue
        width = int(np.prod(t.shape[1:]))
        block = flat[:, at : at + width].reshape(t.shape)
        out.append(block.astype(np.int64) if t is experts else block)
        at += width
    return tuple(out)


def make_decoder(rt: Runtime, max_batch: int = 0, compile_mode: str = "off", progress=None):
    """The static decoder where the model supports it, else the per-request one (why, in the log).
    ``compile_mode`` auto: compiled on a CPU and on a GPU for a model whose weights are plain 16/32-bit."""
    from ..modeling.static_decode import supports_static_decode

    why = supports_static_decode(rt.model)
    if why is not None:
        log.info("decoding each request through the model's own forward (no static-cache step: %s)", why)
        return RequestDecoder(rt, max_batch, why)
    if compile_mode == "auto":
        compile_mode = "on" if not _quantized(rt.model) else "off"
    return StaticDecoder(rt, max_batch, compile_mode, progress)


def _quantized(model) -> bool:
    """Any bitsandbytes 4-bit / 8-bit layer in the model: ``auto`` leaves those eager (their CPU kernels are
    custom ops inductor cannot fuse; compiling them is ``--compile on``)."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
