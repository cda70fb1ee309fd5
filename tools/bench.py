"""The engine and page-render benchmarks: each prints a table, writes JSON. Never run as a timed test.

    python -m tools.bench engine [--model DIR|scale] [--quantize fp32|int4] [--compile on|off] [--tokens 64]
                                 [--repeats 5]
    python -m tools.bench serving [--model DIR] [--compile on|off] [--concurrent 8] [--tokens 96]
    python -m tools.bench render [--repeats 30] [--out bench-results/render.json]
    python -m tools.bench batch [--model glm-scale|random:PATH|DIR] [--tokens 48] [--concurrent 8]
                                                         (a transformers family batched: tools/batch_bench.py)
    python -m tools.bench gpu [--device cuda:0] [--budget-s 480] [--small]   (issue 18: tools/gpu_bench.py)
    python -m tools.bench compare [--quantize int4] [--compare-quantize fp32] [--questions 200]
                                                                        (issue 19: tools/compare.py)

engine: in one run on one machine, on the same model and prompt, greedy decoding with
end-of-text suppressed so every run makes exactly ``--tokens`` tokens; decode rates leave the prompt out:
  (a) the engine with focus + routing on against plain ``model.generate``  (target ratio >= 2.0)
  (b) the engine with focus + routing probes on against off                  (target overhead <= 3%)
  (b') the same with each token's logprob and top-5 alternatives on against off (issue 19: <= 3%)
  (c) time to first token with one image, thinking on; the compile warm-up time and the step forms timed
``--model scale``: the 40-layer scale config in assets/configs (random weights, built at run time).

serving: see tools/serving_bench.py (telemetry cost and continuous batching through /v1).
Ratios are what to quote from a CPU (machines are noisy); absolute times only from a GPU.

render: the page's cost per panel update at real-model sizes (routing 48 layers x 128 experts, a
2,700-patch focus map on a 1920x1080 photo) and the demo's, each with what Gradio then does with the
value (gr.Plot: postprocess = fig.to_json(); gr.Image: encode PNG / JPEG / WebP and write the cache
file, as its postprocess does). Median over --repeats (target: at most 50 ms per update); see
docs/PERFORMANCE.md.

The load test is its own command: ``python -m tools.loadtest`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from autoglm_app.config import ROOT, default_model
from autoglm_app.engine.worker import Engine
from autoglm_app.events import ChatRequest, Message, Options, Stats
from autoglm_app.families import AUTOGLM

log = logging.getLogger("autoglm.bench")


def bench_image() -> Image.Image:
    img = Image.new("RGB", (224, 224), (236, 234, 228))
    img.paste((210, 40, 40), (20, 20, 80, 80))
    img.paste((40, 60, 210), (140, 130, 200, 190))
    return img


def engine_request(tokens: int, probes: bool, image: bool = True, logprobs: int | None = None) -> ChatRequest:
    msg = Message("user", "Describe the image.", [bench_image()] if image else [])
    return ChatRequest([msg], Options(temperature=0.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0,
                                      focus=probes, routing=probes, enable_thinking=True, logprobs=logprobs))


def time_engine(engine: Engine, tokens: int, probes: bool, logprobs: int | None = None) -> tuple[float, Stats]:
    """(wall tokens/s of the whole request, its Stats: ``tokens_per_second`` is the decode rate after the first
    token, what ``time_generate``'s decode rate is compared with)."""
    t0 = time.perf_counter()
    stats = [e for e in engine.run(engine_request(tokens, probes, logprobs=logprobs)) if isinstance(e, Stats)][0]
    elapsed = time.perf_counter() - t0
    assert stats.completion_tokens == tokens, stats
    return tokens / elapsed, stats


@torch.inference_mode()
def time_generate(model, processor, tokens: int) -> float:
    """Seconds of ``model.generate`` for ``tokens`` greedy tokens (end-of-text suppressed) after the prompt."""
    prep = AUTOGLM.prepare(processor, engine_request(tokens, False).messages, True)
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in prep.inputs.items()}
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return elapsed


SCALE_CONFIG = ROOT / "assets" / "configs" / "autoglm-scale-40l.json"


def build_bench_engine(model_path: str, quantize: str | None, compile_mode: str):
    """The engine on ``model_path`` (a checkpoint, or ``scale``: the 40-layer scale config with random weights,
    built here) -> (engine, seconds to load and warm up)."""
    from autoglm_app.config import Settings
    from autoglm_app.server import load_engine

    t0 = time.perf_counter()
    if model_path == "scale":
        from autoglm_app.config import Limits
        from autoglm_app.loading.checkpoints import LoadedModel
        from autoglm_app.modeling.small import build_small

        from autoglm_app.server import set_cpu_threads

        set_cpu_threads(0)  # what the server does: the cores less one (generate runs with the same)
        model, processor = build_small(0, **json.loads(SCALE_CONFIG.read_text()))
        loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-scale-40l (random)",
                             quantize="fp32", device_map=None, plan=None)
        engine = Engine(loaded, Limits(), max_batch=1, compile=compile_mode)
    else:
        engine = load_engine(Settings(model=model_path, quantize=quantize, compile=compile_mode, max_batch=1))
    return engine, time.perf_counter() - t0


def run_engine_bench(model_path: str, quantize: str | None, tokens: int, repeats: int,
                     compile_mode: str = "on") -> dict:
    """The engine (its static step, compiled as ``compile_mode`` says) against ``model.generate`` on the same model,
    prompt and number of tokens; decode rates exclude the prompt (generate's: (tokens - 1) over the time past its
    one-token run)."""
    engine, load_s = build_bench_engine(model_path, quantize, compile_mode)
    model, processor = engine.loaded.model, engine.loaded.processor
    try:
        time_engine(engine, 8, True)  # warm up both paths
        time_engine(engine, 8, False)
        time_generate(model, processor, 8)
        time_engine(engine, 8, True, 5)
        gen, off, on, ttft, wall_on, with_lp = [], [], [], [], [], []
        for r in range(repeats):  # interleaved, so drift in machine speed hits all four alike
            full, first = time_generate(model, processor, tokens), time_generate(model, processor, 1)
            gen.append((tokens - 1) / max(full - first, 1e-9))
            # the engine's three runs in a rotating order: whichever runs later in a repeat was measured slower
            # (by about 1% a place here), which a fixed order would have charged to the probes and the logprobs
            for case in [("off", False, None), ("on", True, None), ("logprobs", True, 5)][r % 3:] + \
                    [("off", False, None), ("on", True, None), ("logprobs", True, 5)][: r % 3]:
                tps, stats = time_engine(engine, tokens, case[1], case[2])
                {"off": off, "on": on, "logprobs": with_lp}[case[0]].append(stats.tokens_per_second)
                if case[0] == "on":
                    wall_on.append(tps)
                    ttft.append(stats.ttft_s)
        decoding = engine.decoding()
    finally:
        engine.close()
    med = statistics.median
    return {
        "model": engine.loaded.model_id,
        "quantize": engine.loaded.quantize,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tokens": tokens,
        "repeats": repeats,
        "compile": compile_mode,
        "step": decoding["step"],
        "step_ms": decoding["step_ms"],
        "load_and_warmup_s": round(load_s, 1),
        "compile_warmup_s": decoding["compile_warmup_s"],
        "generate_decode_tokens_per_s": round(med(gen), 1),
        "engine_probes_off_decode_tokens_per_s": round(med(off), 1),
        "engine_probes_on_decode_tokens_per_s": round(med(on), 1),
        "engine_probes_on_wall_tokens_per_s": round(med(wall_on), 1),
        "ratio_engine_on_vs_generate": round(med(on) / med(gen), 3),
        "probe_overhead": round(1 - med(on) / med(off), 3),
        # the same ratios taken within each repeat, then their median: the runs of one repeat are seconds apart,
        # so a machine whose speed drifts by tens of percent over minutes (seen here) moves both sides alike
        "paired_ratio_engine_on_vs_generate": round(med([a / b for a, b in zip(on, gen)]), 3),
        "paired_probe_overhead": round(1 - med([a / b for a, b in zip(on, off)]), 3),
        "paired_logprobs_overhead": round(1 - med([a / b for a, b in zip(with_lp, on)]), 3),
        "engine_probes_and_logprobs_decode_tokens_per_s": round(med(with_lp), 1),
        "logprobs_overhead": round(1 - med(with_lp) / med(on), 3),
        "ttft_one_image_thinking_ms": round(1000 * med(ttft), 1),
        "raw": {"generate": gen, "engine_off": off, "engine_on": on, "engine_on_logprobs": with_lp, "ttft_s": ttft},
    }


def engine_table(r: dict) -> str:
    forms = ", ".join(f"{k} {v} ms" for k, v in r["step_ms"].items()) or "not timed (compile off)"
    return "\n".join([
        f"model {r['model']} ({r['quantize']}) on {r['device']}, {r['tokens']} tokens, median of {r['repeats']}, "
        f"compile {r['compile']}",
        "| measure | value | target |",
        "|---|---|---|",
        f"| model.generate, decode tok/s | {r['generate_decode_tokens_per_s']} | |",
        f"| engine, probes off, decode tok/s | {r['engine_probes_off_decode_tokens_per_s']} | |",
        f"| engine, focus + routing on, decode tok/s | {r['engine_probes_on_decode_tokens_per_s']} | |",
        f"| engine (probes on) / generate: of the medians; within each repeat, median | "
        f"{r['ratio_engine_on_vs_generate']}; {r['paired_ratio_engine_on_vs_generate']} | ≥ 2.0 |",
        f"| probe overhead (1 - on/off): of the medians; within each repeat, median | {r['probe_overhead']:.1%}; "
        f"{r['paired_probe_overhead']:.1%} | ≤ 3% |",
        f"| engine, probes + logprobs (top 5), decode tok/s | {r['engine_probes_and_logprobs_decode_tokens_per_s']} | |",
        f"| logprobs overhead (1 - with/without, probes on): of the medians; within each repeat | "
        f"{r['logprobs_overhead']:.1%}; {r['paired_logprobs_overhead']:.1%} | ≤ 3% |",
        f"| TTFT, one image, thinking on | {r['ttft_one_image_thinking_ms']} ms | |",
        f"| step kept | {r['step']} | |",
        f"| one-row step, as timed at warm-up | {forms} | |",
        f"| compile + warm-up | {r['compile_warmup_s']} s (load and warm-up {r['load_and_warmup_s']} s) | reported |",
    ])


# ----------------------------------------------------------------------------- render


def bench_photo(width: int = 1920, height: int = 1080, seed: int = 0) -> Image.Image:
    """A photo-like picture (smooth sky and ground, a few shapes, sensor noise): encodes like a photo."""
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    sky = np.array([110, 160, 230]) * (1 - 0.4 * y) + np.array([40, 20, 0]) * x
    ground = np.array([70, 120, 50]) * (1.2 - 0.5 * y) + 30 * np.sin(9 * x + 4 * y)
    pixels = np.where(y < 0.55, sky, ground) + rng.normal(0, 5, (height, width, 3))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        s = int(rng.integers(60, 300))
        draw.ellipse((x0, y0, x0 + s, y0 + s // 2 + 20), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def bench_load(layers: int, experts: int, top_k: int, seed: int = 0) -> tuple[dict, list]:
    """A routing load of that shape as events.expert_load builds it, and one token's routes."""
    import numpy as np

    from autoglm_app.events import ExpertCounts, expert_load

    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.6), size=layers)  # realistic imbalance
    prompt, generated = 1200, 200

    def counts(tokens: int) -> np.ndarray:
        return np.stack([rng.multinomial(tokens * top_k, p) for p in skew]).astype(np.int64)

    text, image, dec = counts(300), counts(prompt - 300), counts(generated)
    c = ExpertCounts(list(range(layers)), experts, top_k, {"prefill": prompt, "decode": generated},
                     text + image, dec, {"text": text + dec, "image": image, "audio": np.zeros_like(dec)},
                     np.zeros(layers, np.int64))
    routes = [(layer, [int(e) for e in rng.choice(experts, top_k, replace=False)],
               [float(w) for w in rng.dirichlet(np.ones(top_k))]) for layer in range(layers)]
    return expert_load(c), routes


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (this process) milliseconds of ``fn``; CPU time is what to quote from a
    shared machine, where other work stretches the wall clock."""
    fn()  # warm up (imports, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return round(1000 * statistics.median(wall), 2), round(1000 * statistics.median(cpu), 2)


def run_render_bench(repeats: int) -> dict:
    import tempfile

    import gradio as gr
    import numpy as np
    from gradio import processing_utils

    from autoglm_app.ui import figures, render

    plot = gr.Plot()
    cache = tempfile.mkdtemp(prefix="bench-render-")
    rows: list[dict] = []

    def add(case: str, size: str, fn, note: str = "") -> None:
        wall, cpu = _median_ms(fn, repeats)
        rows.append({"case": case, "size": size, "ms": wall, "cpu_ms": cpu, "note": note})

    for layers, experts, top_k in ((4, 4, 2), (40, 8, 2), (48, 128, 8)):
        load, routes = bench_load(layers, experts, top_k)
        size = f"{layers} x {experts}, top-{top_k}"
        add("routing heatmap figure + gr.Plot postprocess", size,
            lambda: plot.postprocess(figures.routing_figure(load, "total", routes, "“cat” (token 7)")))
        add("balance figure (decode view) + postprocess", size,
            lambda: plot.postprocess(figures.balance_figure(load, "decode")))
        add("balance line (html)", size, lambda: figures.balance_html(load, "image"))
        add("modality chart + postprocess", size, lambda: plot.postprocess(figures.modality_figure(load)))
        add("token routes (html)", size, lambda: render.token_routes_html(routes, "“cat”"))
        add("Routing tab, all of the above", size, lambda: (
            plot.postprocess(figures.routing_figure(load, "total", routes, "“cat”")),
            plot.postprocess(figures.balance_figure(load, "total")), figures.balance_html(load, "total"),
            plot.postprocess(figures.modality_figure(load)), render.token_routes_html(routes, "“cat”")))
        add("old routing table (routing_heatmap_html)", size,
            lambda: render.routing_heatmap_html(load, "total", routes, "“cat”"), "replaced")
    add("routing heatmap, zoomed: layers 0-12, experts 0-32", "48 x 128, top-8",
        lambda: plot.postprocess(figures.routing_figure(load, "total", routes, "x", (0, 12), (0, 32))))

    rng = np.random.default_rng(0)
    photo, demo = bench_photo(), bench_image()  # a photo; the demo's flat ShapesWorld-like picture
    cases = ((photo, rng.random((45, 60)).astype(np.float32), "1920x1080 photo, 45 x 60 map (2,700 patches)"),
             (demo, rng.random((8, 8)).astype(np.float32), "224x224 image, 8 x 8 map (demo)"))
    for image, heat, size in cases:
        add("focus overlay (display image cached)", size, lambda: render.overlay_heatmap(image, heat, "inferno", 0.55))
        add("focus overlay, first draw of an image", size,
            lambda: render.overlay_heatmap(image.copy(), heat, "inferno", 0.55), "includes shrinking the photo")
        shown = render.overlay_heatmap(image, heat)
        for fmt in ("png", "jpeg", "webp"):
            add(f"focus overlay + gr.Image {fmt.upper()}", size, lambda fmt=fmt: processing_utils.save_pil_to_cache(
                render.overlay_heatmap(image, heat, "inferno", 0.55), cache, format=fmt),
                f"{len(processing_utils.encode_pil_to_bytes(shown, fmt)) // 1024} KiB")
    samples = (np.sin(np.linspace(0, 2000, 160_000)) * rng.random(160_000) * 20000).astype(np.int16)
    focus = rng.random(250).astype(np.float32)
    add("audio focus image", "10 s recording, 250 frames", lambda: render.audio_focus_image(samples, 16000, focus))
    figure = render.audio_focus_image(samples, 16000, focus)
    for fmt in ("png", "jpeg", "webp"):
        add(f"audio focus image + gr.Image {fmt.upper()}", "10 s recording, 250 frames",
            lambda fmt=fmt: processing_utils.save_pil_to_cache(render.audio_focus_image(samples, 16000, focus), cache,
                                                               format=fmt),
            f"{len(processing_utils.encode_pil_to_bytes(figure, fmt)) // 1024} KiB")
    return {"device": f"CPU ({platform.processor() or platform.machine()})", "python": platform.python_version(),
            "gradio": gr.__version__, "repeats": repeats, "target_ms": 50, "rows": rows}


def render_table(r: dict) -> str:
    lines = [f"page render cost per update on {r['device']}, gradio {r['gradio']}, median of {r['repeats']} "
             f"(target ≤ {r['target_ms']} ms)", "",
             "| update | size | wall ms | CPU ms | |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        flag = "" if row["cpu_ms"] <= r["target_ms"] or row["note"] == "replaced" else " **over target**"
        lines.append(f"| {row['case']} | {row['size']} | {row['ms']:.1f} | {row['cpu_ms']:.1f}{flag} | {row['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine", help="engine vs generate, probe overhead, TTFT, compile warm-up")
    e.add_argument("--model", default=default_model(), help="a checkpoint, or 'scale' (assets/configs/"
                                                            "autoglm-scale-40l.json, random weights)")
    e.add_argument("--quantize", default=None)
    e.add_argument("--compile", default="on", choices=("auto", "on", "off"))
    e.add_argument("--tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--out", type=Path, default=Path("bench-results") / "engine.json")
    v = sub.add_parser("serving", help="through /v1: telemetry cost, N concurrent vs sequential")
    v.add_argument("--model", default=default_model())
    v.add_argument("--compile", default="on", choices=("auto", "on", "off"))
    v.add_argument("--tokens", type=int, default=96, help="max_tokens of each request")
    v.add_argument("--repeats", type=int, default=7)
    v.add_argument("--concurrent", type=int, default=8)
    v.add_argument("--out", type=Path, default=Path("bench-results") / "serving.json")
    r = sub.add_parser("render", help="page render cost per update (routing figures, focus overlay, encodings)")
    r.add_argument("--repeats", type=int, default=30)
    r.add_argument("--out", type=Path, default=Path("bench-results") / "render.json")
    from tools.batch_bench import add_parser as add_batch_parser

    add_batch_parser(sub)
    from tools.gpu_bench import add_parser as add_gpu_parser

    add_gpu_parser(sub)
    from tools.compare import add_parser as add_compare_parser

    add_compare_parser(sub)  # the same command as python -m tools.compare (tools/compare.py)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.what == "compare":
        from tools.compare import compare_table, run_from_args as run_compare

        result = run_compare(args)
        table = compare_table(result)
    elif args.what == "batch":
        from tools.batch_bench import batch_table, run_from_args as run_batch

        result = run_batch(args)
        table = batch_table(result)
    elif args.what == "gpu":
        from tools.gpu_bench import gpu_table, run_from_args

        result = run_from_args(args)
        table = gpu_table(result)
    elif args.what == "render":
        result = run_render_bench(args.repeats)
        table = render_table(result)
    elif args.what == "serving":
        from tools.serving_bench import run_serving_bench, serving_table

        result = run_serving_bench(args.model, args.compile, args.tokens, args.repeats, args.concurrent)
        table = serving_table(result)
    else:
        result = run_engine_bench(args.model, args.quantize, args.tokens, args.repeats, args.compile)
        table = engine_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
