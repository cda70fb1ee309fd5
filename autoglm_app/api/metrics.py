"""``/metrics``: Prometheus text format, with vLLM's metric names so existing dashboards read this server.

The engine calls ``EngineMetrics.observe(request, event)`` for every event it puts (``Engine.observers``),
on the thread that puts it; the work per event is a type check, and per request a handful of
histogram observations when its Stats and Done arrive. Gauges of the queue are read when scraped.

vLLM names (label ``model_name``): ``vllm:time_to_first_token_seconds``,
``vllm:inter_token_latency_seconds``, ``vllm:e2e_request_latency_seconds``,
``vllm:request_queue_time_seconds``, ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:request_success_total`` (label ``finished_reason``), ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``. There is no paged or preallocated KV cache
to be a share of (each request grows its own), so the KV figure is the honest one for a dynamic cache:
the tokens the running request's cache holds (prompt plus tokens generated so far) over the context
limit, a fraction in [0, 1] as vLLM's is (0 when idle; the remote backend reports 0, the remote server
has its own). Inter-token latency is observed once per generated token after the first with the
request's mean gap, so its ``_sum`` and ``_count`` are exact and only its buckets are smoothed within a
request.

The project's own (``autoglm:``): expert load per layer and expert (``expert_load_tokens_total``),
routing balancedness per layer of the last request (mean load / max load, SGLang's figure), the same
over the last 10 / 100 / 1,000 routed tokens of the last request (``routing_balancedness_window``,
label ``window``), the share of experts that took no token (``routing_dead_experts_fraction``, label
``window``: "10", "100", "1000" or "all" = the whole request), exp(H)/N expert diversity of the last
request's load (``routing_expert_diversity``), routed tokens by phase (``routed_tokens_total``, label
``phase``: prefill, reasoning, answer), expert choices dropped by capacity, the attention mass each
generated token paid to the images and recordings (``focus_media_mass``), and failed requests by kind.
"""

from __future__ import annotations

import threading

import numpy as np
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..events import ChatRequest, Done, Error, Event, Focus, Routing, Stats, newest_counted

# seconds; vLLM's buckets for the same figures, cut to what a 2-core CPU or one GPU can show
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0)
MASS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class EngineMetrics:
    """The metrics of one engine in a registry of their own (one per app, so tests can build many)."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (from the start of work).",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between generated tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, queueing included.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time a request waited in the queue.", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               [*m, "finished_reason"], registry=r)
        self.errors = Counter("autoglm:request_errors", "Requests that ended in an error, by kind.",
                              [*m, "kind"], registry=r)
        running = Gauge("vllm:num_requests_running", "Requests being generated now.", m, registry=r)
        waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the queue.", m, registry=r)
        # read when scraped; a stand-in engine in tests may have neither
        running.labels(model_name).set_function(lambda: getattr(engine, "running", 0))
        waiting.labels(model_name).set_function(lambda: engine.queue_length() if hasattr(engine, "queue_length")
                                                else 0)
        kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage: tokens held by the running request's cache over "
                   "the context limit (1 = full; the cache grows per request).", m, registry=r)
        kv.labels(model_name).set_function(lambda: float(getattr(engine, "kv_cache_usage", 0.0)))
        self.expert_load = Counter("autoglm:expert_load_tokens", "Expert choices per MoE layer and expert.",
                                   [*m, "layer", "expert"], registry=r)
        self.balancedness = Gauge("autoglm:routing_balancedness",
                                  "Mean over max expert load per layer, last request (1 = even).",
                                  [*m, "layer"], registry=r)
        self.balancedness_window = Gauge(
            "autoglm:routing_balancedness_window",
            "Mean over max expert load per layer over the last W routed tokens of the last request.",
            [*m, "layer", "window"], registry=r)
        self.dead = Gauge("autoglm:routing_dead_experts_fraction",
                          "Share of a layer's experts that took no token in the window, last request.",
                          [*m, "layer", "window"], registry=r)
        self.diversity = Gauge("autoglm:routing_expert_diversity",
                               "exp(entropy of the layer's expert load) / experts, last request (1 = even).",
                               [*m, "layer"], registry=r)
        self.routed_tokens = Counter("autoglm:routed_tokens", "Tokens routed through the MoE layers, by phase.",
                                     [*m, "phase"], registry=r)
        self.dropped = Counter("autoglm:routing_dropped_tokens", "Expert choices dropped by capacity limits.", m,
                               registry=r)
        self.focus_mass = Histogram("autoglm:focus_media_mass",
                                    "Attention mass a generated token paid to the images and recordings.", m,
                                    buckets=MASS_BUCKETS, registry=r)
        for metric in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens,
                       self.dropped, self.focus_mass):
            metric.labels(model_name)  # present (at zero) from the first scrape, as vLLM's are
        # request id -> (its newest Routing event, the newest that came with counts)
        self._last_routing: dict[int, tuple[Routing, Routing | None]] = {}
        self._lock = threading.Lock()

    def observe(self, request: ChatRequest, event: Event) -> None:
        """One event of one request (Engine.observers)."""
        name = self.model_name
        if isinstance(event, Routing):
            counted = event if event.counts is not None else self._last_routing.get(id(request), (None, None))[1]
            self._last_routing[id(request)] = (event, counted)  # only the newest running load is read
        elif isinstance(event, Focus):
            self.focus_mass.labels(name).observe(event.mass)
        elif isinstance(event, Stats):
            self._stats(event)
        elif isinstance(event, (Done, Error)):
            routing = newest_counted(*self._last_routing.pop(id(request), (None, None)))
            if isinstance(event, Done):
                self.success.labels(name, event.finish_reason).inc()
            else:
                self.errors.labels(name, event.kind).inc()
            if routing is not None:
                self._routing(routing.load)

    def _stats(self, s: Stats) -> None:
        name = self.model_name
        self.ttft.labels(name).observe(s.ttft_s)
        self.queue.labels(name).observe(s.queue_s)
        self.e2e.labels(name).observe(s.queue_s + s.total_s)
        self.prompt_tokens.labels(name).inc(s.prompt_tokens)
        self.generation_tokens.labels(name).inc(s.completion_tokens)
        gaps = s.completion_tokens - 1
        if gaps > 0:
            itl = self.itl.labels(name)
            mean_gap = (s.total_s - s.ttft_s) / gaps
            for _ in range(gaps):
                itl.observe(mean_gap)

    def _routing(self, load: dict) -> None:
        name = self.model_name
        total = np.asarray(load["total"], dtype=np.int64)
        with self._lock:  # the counters of one request go in together
            for row, layer in zip(total, load["layers"]):
                for expert, n in enumerate(row):
                    if n:
                        self.expert_load.labels(name, str(layer), str(expert)).inc(int(n))
                peak = row.max()
                self.balancedness.labels(name, str(layer)).set(float(row.mean() / peak) if peak else 1.0)
            for window, rows in load.get("balancedness", {}).items():
                if window != "all":
                    for layer, value in zip(load["layers"], rows):
                        self.balancedness_window.labels(name, str(layer), window).set(value)
            for window, rows in load.get("dead_fraction", {}).items():
                for layer, value in zip(load["layers"], rows):
                    self.dead.labels(name, str(layer), window).set(value)
            for layer, value in zip(load["layers"], load.get("diversity", [])):
                self.diversity.labels(name, str(layer)).set(value)
            tokens = {"prefill": load.get("tokens", {}).get("prefill", 0), **load.get("phase_tokens", {})}
            for phase, n in tokens.items():
                if n:
                    self.routed_tokens.labels(name, phase).inc(int(n))
            dropped = int(np.sum(load["dropped"]))
            if dropped:
                self.dropped.labels(name).inc(dropped)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def mount_metrics(app: FastAPI, engine, model_name: str) -> EngineMetrics:
    """Serve ``GET /metrics`` for ``engine`` (registering its observer) and return the metrics."""
    metrics = EngineMetrics(engine, model_name)
    if hasattr(engine, "observers"):  # Engine and RemoteEngine; a test's stand-in has none
        engine.observers.append(metrics.observe)

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return metrics
