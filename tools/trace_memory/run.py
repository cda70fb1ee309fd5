"""The command: parse, drive the turns through the page's session code, measure, print and write."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .report import summarize, table, turns_table

log = logging.getLogger("autoglm.trace_memory")

# the 40-layer random AutoGLM whose Focus events are reproduced (build_small(**SCALE)): 24 x 24 patches
SCALE = dict(num_hidden_layers=40, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             num_experts=8, moe_layers=list(range(40)), image_size=384, patch_size=16)
POOL = 8  # distinct synthetic stacks, copied afresh for every token


def default_budget_mb() -> float:
    from autoglm_app.config import Settings

    return next(f.default for f in dataclasses.fields(Settings) if f.name == "trace_memory_mb")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="python -m tools.trace_memory", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=20, help="turns driven")
    p.add_argument("--tokens", type=int, default=1000, help="generated tokens per turn")
    p.add_argument("--sessions", type=int, default=5,
                   help="browser sessions the turns go to, round robin (one session may hold a quarter of the "
                        "budget, so 4 or more fill the server-wide budget)")
    p.add_argument("--trace-memory-mb", type=float, default=None,
                   help="the page's budget, as the server's flag (default: the server's default)")
    p.add_argument("--layers", type=int, default=SCALE["num_hidden_layers"], help="decoder layers per focus stack")
    p.add_argument("--grid", type=int, default=SCALE["image_size"] // SCALE["patch_size"],
                   help="patch grid side (rows = cols)")
    p.add_argument("--real-tokens", type=int, default=0,
                   help="first generate this many tokens with the real random AutoGLM of that shape (in a child "
                        "process) and check its Focus events against the synthetic ones; 0 = skip")
    p.add_argument("--sample-every", type=int, default=100, help="tokens between two readings of the RSS")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "trace_memory.json")
    a = p.parse_args(argv)
    a.trace_memory_mb = default_budget_mb() if a.trace_memory_mb is None else a.trace_memory_mb
    if min(a.turns, a.tokens, a.sessions, a.layers, a.grid, a.sample_every) < 1 or a.real_tokens < 0 \
            or not a.trace_memory_mb > 0:
        p.error("--turns, --tokens, --sessions, --layers, --grid, --sample-every >= 1; --trace-memory-mb > 0; "
                "--real-tokens >= 0")
    return a


def synthetic_pool(layers: int, patches: int, seed: int = 0) -> list[np.ndarray]:
    """(layers, patches) float32 head-mean attention rows over the image, as FocusProbe.take returns them:
    non-negative, each layer's row summing to the image's share of the attention (0.3 .. 0.9)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        x = rng.gamma(0.3, size=(layers, patches)).astype(np.float32)
        x *= (rng.uniform(0.3, 0.9, size=(layers, 1)) / x.sum(axis=1, keepdims=True)).astype(np.float32)
        pool.append(x)
    return pool


class SyntheticHandle:
    """A RequestHandle's events for one turn: per token an Answer and a Focus of the real shape."""

    def __init__(self, pool: list[np.ndarray], grid: int, tokens: int, on_token=None):
        self.pool, self.grid, self.tokens, self.on_token = pool, grid, tokens, on_token
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def events(self):
        from autoglm_app.events import Answer, Done, Focus, aggregate_layers

        for n in range(self.tokens):
            per_layer = self.pool[n % len(self.pool)].copy()  # a fresh array per token, as the probe's
            image = per_layer[:, : self.grid * self.grid].reshape(-1, self.grid, self.grid)  # probes.split
            yield Answer(f" w{n}")
            yield Focus(n, f" w{n}", "answer", images=[aggregate_layers(image, "mean")], audios=[],
                        per_layer_images=[image])
            if self.on_token is not None:
                self.on_token(n + 1)
        yield Done("length")


def drive(a: argparse.Namespace) -> dict:
    """The turns through one page's SessionStore and TraceBudget; the RSS before, during and after."""
    from autoglm_app.memory import rss_bytes
    from autoglm_app.ui.session import Session, SessionStore, Turn, stream_turn
    from autoglm_app.ui.traces import TraceBudget, cast

    cast(np.zeros(2, np.float32), np.float16)  # loads torch (its casts), as the server has it loaded
    pool = synthetic_pool(a.layers, a.grid * a.grid)
    image = Image.new("RGB", (a.grid * 16, a.grid * 16), "gray")  # one object, shared by every turn
    budget = TraceBudget(a.trace_memory_mb)
    store = SessionStore(traces=budget)
    sessions = [Session() for _ in range(a.sessions)]
    for s in sessions:
        store.put(s)  # as the page's load event does
    samples: list[dict] = []
    done = 0

    def sample(turn: int, tokens: int, turn_end: bool = False) -> None:
        samples.append({"turn": turn, "tokens": tokens, "growth": rss_bytes() - rss0, "detail": budget.held,
                        "kept": budget.kept, "turn_end": turn_end})

    gc.collect()
    rss0 = rss_bytes()
    started = time.perf_counter()
    for t in range(a.turns):
        session = sessions[t % len(sessions)]
        store.touch(session)  # as Handlers._new_turn does
        session.start(Turn(f"question {t + 1}", images=[image]))

        def on_token(n: int, t=t) -> None:
            if n % a.sample_every == 0:
                sample(t + 1, done + n)

        handle = SyntheticHandle(pool, a.grid, a.tokens, on_token)
        for _ in stream_turn(None, session, f"session-{t % len(sessions)}", handle=handle):
            pass
        done += a.tokens
        sample(t + 1, done, turn_end=True)
        log.info("turn %d: %d tokens, RSS +%.1f MiB, detail %.1f MiB, shown maps + records %.1f MiB", t + 1, done,
                 samples[-1]["growth"] / 2**20, budget.held / 2**20, budget.kept / 2**20)
    wall = time.perf_counter() - started
    gc.collect()
    growth_end = rss_bytes() - rss0
    counts = budget.summary()
    unbounded = a.turns * a.tokens * a.layers * a.grid * a.grid * 2  # float16, as Turn.apply keeps it
    summary = summarize(budget.limit, max(s["growth"] for s in samples), growth_end, counts, unbounded)
    summary["us_per_token"] = 1e6 * wall / (a.turns * a.tokens)
    return {"summary": summary, "counts": counts, "samples": samples, "rss_before_bytes": rss0}


def real_focus(tokens: int, layers_grid: tuple[int, int]) -> dict:
    """In a child process: ``tokens`` tokens from the real random AutoGLM (SCALE) through the page's session
    code; its Focus events' shapes and dtypes against the synthetic ones."""
    from autoglm_app.config import Limits
    from autoglm_app.engine.worker import Engine
    from autoglm_app.events import ChatRequest, Focus, Message, Options
    from autoglm_app.loading.checkpoints import LoadedModel
    from autoglm_app.modeling.small import build_small
    from autoglm_app.ui.session import Session, Turn, stream_turn
    from autoglm_app.ui.traces import RECORD_BYTES, TraceBudget

    model, processor = build_small(0, **SCALE)
    loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-random-40l", quantize="fp32",
                         device_map=None, plan=None)
    engine = Engine(loaded, Limits(), max_batch=1, compile="off")
    try:
        image = Image.new("RGB", (SCALE["image_size"], SCALE["image_size"]), "gray")
        options = Options(enable_thinking=False, temperature=0.0, max_new_tokens=tokens, min_new_tokens=tokens,
                          routing=False)
        t0 = time.perf_counter()
        handle = engine.submit(ChatRequest([Message("user", "Describe the image.", [image])], options, "trace-memory"))
        events = list(handle.events())
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    focus = [e for e in events if isinstance(e, Focus)]
    session, budget = Session(), TraceBudget(1e6)
    budget.join(session)
    session.start(Turn("Describe the image.", images=[image]))
    list(stream_turn(None, session, "trace-memory", handle=_Replay(events)))
    turn = session.turns[-1]
    layers, grid = layers_grid
    first = focus[0] if focus else None
    return {"tokens": len(focus), "s_per_token": wall / max(len(focus), 1),
            "per_layer_image": [list(first.per_layer_images[0].shape), str(first.per_layer_images[0].dtype)]
            if first and first.per_layer_images else None,
            "image": [list(first.images[0].shape), str(np.asarray(first.images[0]).dtype)] if first else None,
            "detail_bytes_per_token": budget.held / max(len(focus), 1),
            "kept_bytes_per_token": budget.kept / max(len(focus), 1),
            "synthetic_detail_bytes_per_token": layers * grid * grid * 2,
            "synthetic_kept_bytes_per_token": grid * grid * 4 + RECORD_BYTES,
            "same_shape": bool(first and first.per_layer_images
                               and tuple(first.per_layer_images[0].shape) == (layers, grid, grid)
                               and len(turn.tokens) == len(focus))}


class _Replay:
    def __init__(self, events: list):
        self._events, self.cancelled = events, False

    def cancel(self) -> None:
        self.cancelled = True

    def events(self):
        yield from self._events


def run_real(tokens: int, layers_grid: tuple[int, int]) -> dict:
    """``real_focus`` in a fresh process, so its model's freed memory cannot hide the traces' growth here."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        try:
            return pool.apply(real_focus, (tokens, layers_grid))
        except Exception as e:  # the check is optional: say why it failed, measure the rest
            log.exception("the real-model check failed")
            return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse(argv)
    real = run_real(a.real_tokens, (a.layers, a.grid)) if a.real_tokens else None
    result = drive(a)
    config = {"turns": a.turns, "tokens": a.tokens, "sessions": a.sessions, "trace_memory_mb": a.trace_memory_mb,
              "layers": a.layers, "grid": [a.grid, a.grid], "events": "synthetic Focus events of the real shape "
              "through Session.start / stream_turn / Turn.apply / TraceBudget", "model_shape": SCALE,
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "cpus": os.cpu_count()}
    result = {"config": config, **result, "real_check": real}
    print(table(config, result["summary"]))
    print()
    print(turns_table(result["samples"]))
    print(f"\n{result['summary']['us_per_token']:.0f} µs of page code per token (fold + count + give way)")
    if real is not None and "error" not in real:
        print(f"real-model check: {real['tokens']} tokens of the 40-layer random AutoGLM ({real['s_per_token'] * 1e3:.0f} "
              f"ms/token): per-layer map {real['per_layer_image']}, {real['detail_bytes_per_token']:,.0f} B/token of "
              f"detail, {real['kept_bytes_per_token']:,.0f} kept; synthetic: {real['synthetic_detail_bytes_per_token']:,} "
              f"and {real['synthetic_kept_bytes_per_token']:,} -> {'same shape' if real['same_shape'] else 'DIFFERENT'}")
    elif real is not None:
        print(f"real-model check failed: {real['error']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return result
