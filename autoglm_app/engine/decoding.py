"""How the worker advances every admitted request by one token: the decoders.

``StaticDecoder`` (AutoGLM): one batched step over a static KV cache (``modeling.static_decode``) for
all the requests in flight; slot i holds the i-th request, and the batch stays packed at the front
(a request that ends hands its slot to the last one). The step returns the logits and, for the rows
that asked, the focus rows and routed experts; they come to the host in one copy per step (plus the
logits), each row is sampled with its own request's sampler, and the telemetry is handed to that
request. The step can be compiled (``--compile``): ``torch.compile`` with inductor (its C++ wrapper on
the CPU; CUDA graphs on a GPU, mode ``reduce-overhead``), warmed up on the shapes it will see while
the model loads.

``HFBatchDecoder`` (``hf_decoding``; the transformers families): the requests in flight in one forward of
the model's own text layers over a slot cache, not compiled.

``RequestDecoder`` (what neither can take: AutoGLM with memory slots, a transformers model with sliding-window
layers): each request keeps its own DynamicCache and goes through the model's own forward with its hook probes,
one after the other within a step, so requests still interleave token by token.

All share the slot arithmetic (``rows``): a slot holds one request of up to the context limit, and
``max_batch`` slots exist (``choose_max_batch`` from the memory there is when it is not given).
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch

from .generation import Generation
from .runtime import Runtime
from ..events import MAX_TOP_LOGPROBS
from .rows import KEYS_BUCKET, MediaRows, accept_rows, choose_max_batch, greedy_picks, kv_bytes_per_token
from .sampling import logprob_rows, unpack_logprobs

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")
# the one-graph step runs every expert on every row: past this many bytes of expert weights per step (more than a
# CPU's last-level cache holds) the layer-group graphs, each reading only its rows' chosen experts, are the candidate
# instead (measured on the 40-layer scale config, 2 MiB of experts per layer: every expert on every row took 48 ms a
# token in the eager step against 27 ms for the chosen experts alone)
DENSE_EXPERTS_BYTES = 32 * 2**20
# that form runs this many layers to a graph (``LayerGroups``): on the scale config at one row, 1 layer a graph ran
# at 23-24 ms a token, 4 at 17-20 ms (each call costs ~0.25 ms of dynamo, AOT and C++-wrapper work), 8 at 22-23 ms;
# compile and warm-up from an empty inductor cache took 91 s at 4 and 123 s at 8
LAYERS_PER_GRAPH = 4
GROUPED = "compiled in layer groups, chosen experts"


class RequestDecoder:
    """Each request its own cache and forward (the model's own), one after the other within a step."""

    batched = False
    batched_prefill = False  # requests admitted together are prefilled one by one
    compiled = False
    warmup_s = 0.0
    note = ""

    def __init__(self, rt: Runtime, max_batch: int, why: str = ""):
        self.rt = rt
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        self.note = why

    @property
    def kv_bytes(self) -> int:
        """What ``max_batch`` full slots would hold (each request's cache grows as it goes)."""
        return self.max_batch * self.slot_bytes

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


class StaticDecoder:
    """All the requests in flight in one step over a static KV cache (AutoGLM)."""

    batched = True
    batched_prefill = True  # requests admitted together share one prefill forward (``prefill``)

    def __init__(self, rt: Runtime, max_batch: int, compile_mode: str = "off", progress=None):
        from ..modeling import static_decode as sd

        self.rt, self.sd = rt, sd
        self.slot_bytes = rt.context_limit * kv_bytes_per_token(rt.model)
        self.max_batch = choose_max_batch(self.slot_bytes, rt.device, max_batch)
        # a spare slot when there is one slot and the step may be compiled on a CPU: one row can then run as two
        # (``_measure``); its positions are scratch, never read for a request
        spare = int(compile_mode != "off" and rt.device.type != "cuda" and self.max_batch == 1)
        self.kv = sd.StaticKV(rt.model, self.max_batch + spare, rt.context_limit)
        self.fused = sd.fuse_weights(rt.model)
        self.compiled, self.warmup_s, self.note, self.timings = False, 0.0, "", {}
        self.variant = "eager"
        self._run = self._eager
        self.lp_width, self._lp_k = 0, 0  # the one-graph form's telemetry ends with each row's logprob_pack: its columns
        self.greedy_width = 0  # then its greedy_pack's
        self._forms: dict = {"eager": self._eager}
        self._pads: dict[str, bool] = {}  # form -> one row runs as two (its copy in the next slot): measured faster
        self.pad_one = False
        self._media_rows = MediaRows(rt.device)
        self._no_media: dict[int, torch.Tensor] = {}  # rows -> the (rows, 2) zeros a compiled step reads for no media
        if compile_mode != "off":
            self._compile(progress)

    # ------------------------------------------------------------------ the step's forms
    def _eager(self, tokens, positions, keys_seen, media, probes):
        sd = self.sd
        return sd.decode_step(self.rt.model, self.fused, self.kv, tokens, positions, keys_seen, media, probes)

    def _compile(self, progress) -> None:
        """Compile two forms of the step and keep the fastest of them and the eager one, timed here on this
        machine and model: the whole step as one graph (every expert on every row) or, for a model whose experts
        are over ``DENSE_EXPERTS_BYTES``, one graph per ``LAYERS_PER_GRAPH`` layers with each row's chosen experts
        read by index inside it. Both are warmed up on the shapes requests bring (dynamic
        sizes: rows, cache length, media keys), so no request waits for a compile; in compiled forms the
        probes are always computed (one graph, not two). Any failure leaves the eager step, with the reason
        in the log."""
        import torch._inductor.config as inductor

        t0 = time.perf_counter()
        if progress is not None:
            progress.stage("compiling the decode step (torch.compile)")
        cuda = self.rt.device.type == "cuda"
        sd, model = self.sd, self.rt.model
        forms = {"eager": self._eager}
        try:
            if not cuda:
                inductor.cpp_wrapper = True  # the generated code calls its kernels from C++, not Python
            mode = "reduce-overhead" if cuda else None
            # the one graph also computes every row's logprobs (top 20, the most a request may ask for): inside the
            # graph that costs a few microseconds, outside it (logprob_rows) a few tens of op launches
            lp_k = min(MAX_TOP_LOGPROBS, model.get_output_embeddings().out_features)
            # and every row's greedy pick (greedy_pack), so a greedy row is sampled without an op on the host
            picks = (torch.tensor(self.rt.banned_ids, dtype=torch.long, device=self.rt.device),
                     torch.tensor(self.rt.stop_list, dtype=torch.long, device=self.rt.device))
            # dynamic=None: torch.compile's automatic dynamic shapes. A size becomes a symbol once the warm-up has
            # seen it change (rows, cache length, media keys); weights, caches and the model's constants stay
            # static. dynamic=True traced all of them as symbols, and every call then evaluated hundreds of
            # symbolic guards (a NaN check on each float constant among them)
            if cuda or self._dense_bytes() <= DENSE_EXPERTS_BYTES:
                whole = torch.compile(functools.partial(sd.decode_step_span, experts_fn=sd.experts_dense,
                                                        logprob_k=lp_k, greedy=picks), mode=mode, dynamic=None)
                forms["compiled, one graph"] = self._one_graph(whole)
            else:
                head = torch.compile(sd.head_step, mode=mode, dynamic=None)
                groups = sd.LayerGroups(model, self.fused, self.kv,
                                        lambda fn: torch.compile(fn, mode=mode, dynamic=None), LAYERS_PER_GRAPH)
                forms[GROUPED] = lambda t, p, k, m, probes: sd.decode_step(
                    model, self.fused, self.kv, t, p, k, m, True, head, groups=groups)
            self.timings = self._measure(forms)
        except Exception as e:
            log.warning("the decode step could not be compiled (%s: %s); decoding eagerly",
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            self.note = f"compile failed: {type(e).__name__}"
            inductor.cpp_wrapper = False  # (a global setting: what compiles next in the process starts plain)
            return
        self._forms, self._lp_k = forms, lp_k
        self.use(min(self.timings, key=self.timings.get))
        self.warmup_s = time.perf_counter() - t0
        log.info("decode step: %s, compile and warm-up %.1f s",
                 ", ".join(f"{k} {v:.2f} ms" + (" (one row as two)" if self._pads.get(k) else "")
                           for k, v in self.timings.items()) + f" -> {self.variant}", self.warmup_s)

    def _one_graph(self, whole):
        """The one-graph form's call: the cache length goes in as the size of a view of a preallocated vector
        (``decode_step_span``), so that it and the media keys can be marked dynamic at the first call; otherwise
        torch.compile first makes a graph for the warm-up's first sizes, one compile of the whole step in three."""
        model, span = self.rt.model, torch.empty(self.kv.capacity, dtype=torch.int8, device=self.rt.device)
        marked: set = set()

        def run(tokens, positions, keys_seen, media, probes):
            s = span[:keys_seen]
            self.sd.mark_dynamic_once(marked, "whole", (s, 0), (media, 1))
            return whole(model, self.fused, self.kv, tokens, positions, s, media, True)

        return run

    def use(self, variant: str) -> None:
        """Decode with one of the forms ``_compile`` made ("eager", "compiled, one graph", ``GROUPED``): the fastest,
        or the one a test asks for."""
        self.variant, self._run = variant, self._forms[variant]
        self.pad_one = self._pads.get(variant, False)
        self.compiled = variant != "eager"
        whole = variant == "compiled, one graph"
        self.lp_width = 2 + 2 * self._lp_k if whole else 0
        self.greedy_width = 4 if whole else 0  # its telemetry ends with greedy_pack's four columns

    def _dense_bytes(self) -> int:
        """What a step reads of the experts' weights when every expert runs on every row."""
        return sum(p.numel() * p.element_size() for _, moe in self.rt.model.moe_blocks() for p in moe.experts.parameters())

    def _media(self, media, tokens):
        """Compiled forms always compute focus: a row without media reads key 0 (discarded on the host). The zeros are
        made once per row count (the step only reads them)."""
        if media is not None:
            return media
        n = tokens.shape[0]
        if n not in self._no_media:
            # two keys at least: torch.compile specialises a size of 1, which would be a second graph
            self._no_media[n] = torch.zeros(n, 2, dtype=torch.long, device=tokens.device)
        return self._no_media[n]

    @torch.inference_mode()
    def _measure(self, forms: dict) -> dict:
        """Each form warmed up on four shapes (so dynamic sizes are traced), then timed at one row in turn, one call
        of each form after another (a machine whose speed drifts, as a shared one's does by tens of percent within
        seconds, then slows every form alike; timed one form after the other, a drift once kept the eager step):
        median ms. Each form is also timed with the row run as two rows (a copy of it in the next slot, its output
        dropped), and keeps that where it is faster (``_pads``): torch.compile gives one row a graph of its own
        (it specialises a size of 1), and on this project's 2-core CPU that graph took 3.9 ms where the dynamic
        one ran two rows in 3.3 ms (inductor, the demo model)."""
        dev = self.rt.device
        for run in forms.values():
            # torch.compile marks a size dynamic once it has seen it change; one row is its own graph (a size of 1 is
            # specialised), so it gets two shapes of its own
            for rows, keys, width in ((1, KEYS_BUCKET, 4), (1, 2 * KEYS_BUCKET, 9), (2, 2 * KEYS_BUCKET, 9),
                                      (3, 3 * KEYS_BUCKET, 17)):
                rows, keys = min(rows, self.max_batch), min(keys, self.kv.capacity)
                tokens = torch.zeros(rows, dtype=torch.long, device=dev)
                positions = torch.full((rows,), keys - 1, dtype=torch.long, device=dev)
                run(tokens, positions, keys, torch.zeros(rows, width, dtype=torch.long, device=dev), True)
        pads = self.kv.slots > 1 and dev.type != "cuda"  # the eager step is never padded: it is timed at one row only
        times: dict[tuple[str, int], list[float]] = {
            (name, rows): [] for name in forms for rows in ((1, 2) if pads and name != "eager" else (1,))}
        for _ in range(31):
            for (name, rows), t in times.items():
                tokens = torch.zeros(rows, dtype=torch.long, device=dev)
                positions = torch.full((rows,), KEYS_BUCKET - 1, dtype=torch.long, device=dev)
                media = torch.zeros(rows, 4, dtype=torch.long, device=dev)
                t0 = time.perf_counter()
                forms[name](tokens, positions, KEYS_BUCKET, media, True)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t.append(1000 * (time.perf_counter() - t0))
        median = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
        out = {}
        for name in forms:
            solo, two = median[(name, 1)], median.get((name, 2), float("inf"))
            self._pads[name] = two < solo
            out[name] = two if self._pads[name] else solo
        return out

    # ------------------------------------------------------------------ slots
    @property
    def kv_bytes(self) -> int:
        """The static cache's bytes: ``max_batch`` slots, and the spare one when there is one."""
        return self.kv.slots * self.slot_bytes

    def admit(self, slot: int, gen: Generation) -> None:
        """Copy the request's prefilled cache into ``slot``; the request's own cache goes."""
        self.kv.load(slot, gen.cache, gen.cache_tokens, gen.cache_row)
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
        media, widths = self._media_rows(gens)
        probes = media is not None or any(g.routing is not None for g in gens)
        pad = n == 1 and self.pad_one  # the row and its copy in slot 1 (free, or the spare slot): see _measure
        tokens = torch.tensor([g.token for g in gens] * (1 + pad), dtype=torch.long, device=dev)
        pos = torch.tensor(positions * (1 + pad), dtype=torch.long, device=dev)
        if self.compiled and media is None:
            media = self._media(None, tokens)
        elif pad and media is not None:
            media = media.repeat(2, 1)
        logits, telemetry = self._run(tokens, pos, keys_seen, media, probes)
        if pad:
            logits, telemetry = logits[:1], telemetry[:1] if telemetry is not None else None
        asked = any(g.req.options.logprobs is not None for g in gens)
        stats = [None] * n
        if asked and not self.lp_width:  # on the logits' device, for every row at once, before the copy
            stats = logprob_rows(logits, max(g.req.options.logprobs or 0 for g in gens))
        logits = logits.cpu()
        focus_h = experts_h = weights_h = None
        greedy_h = None
        if telemetry is not None:
            host = telemetry.cpu().numpy()
            if self.greedy_width:
                greedy_h, host = host[:, -self.greedy_width:], host[:, : -self.greedy_width]
            if self.lp_width:
                if asked:
                    stats = unpack_logprobs(host[:, -self.lp_width:])
                host = host[:, : -self.lp_width]
            focus_h, experts_h, weights_h = self.sd.split_telemetry(
                host, self.rt.num_layers, media.shape[1] if media is not None else 0,
                len(self.rt.routers), self.rt.top_k)
        picks = greedy_picks(gens, logits, greedy_h, stats)
        return accept_rows(gens, logits, stats, picks, focus_h, widths, experts_h, weights_h)


def make_decoder(rt: Runtime, max_batch: int = 0, compile_mode: str = "off", progress=None):
    """The static decoder where the model supports it, else the per-request one (why, in the log).
    ``compile_mode`` auto: compiled for a model whose weights are plain 16/32-bit, the static decoder on a CPU and
    a GPU, the transformers families' batched step on a GPU only (on this CPU its compile and warm-up took 534 s on
    the 40-layer scale config, for 1.3x alone and 0.7x to 1.1x at 8 rows)."""
    from ..modeling.static_decode import supports_static_decode

    why = supports_static_decode(rt.model)
    if why is not None:
        from ..families.hf_batch import batch_support

        not_batched = batch_support(rt.model, rt.family)
        if not_batched is None:
            from .hf_decoding import HFBatchDecoder

            log.info("decoding the requests in flight together through the model's own layers (%s)", why)
            if compile_mode == "auto":  # a GPU's CUDA graphs; on a CPU it did not pay: docs/PERFORMANCE.md
                compile_mode = "on" if rt.device.type == "cuda" and not _quantized(rt.model) else "off"
            return HFBatchDecoder(rt, max_batch, f"batched through the model's own layers ({why})", compile_mode,
                                  progress)
        log.info("decoding each request through the model's own forward (no batched step: %s; %s)", why,
                 not_batched)
        return RequestDecoder(rt, max_batch, f"{why}; {not_batched}")
    if compile_mode == "auto":
        compile_mode = "on" if not _quantized(rt.model) else "off"
    return StaticDecoder(rt, max_batch, compile_mode, progress)


def _quantized(model) -> bool:
    """Any bitsandbytes 4-bit / 8-bit layer in the model: ``auto`` leaves those eager (their CPU kernels are
    custom ops inductor cannot fuse; compiling them is ``--compile on``)."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
