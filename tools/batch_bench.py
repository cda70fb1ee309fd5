"""Continuous batching for a transformers family, in process: ``python -m tools.bench batch``.

On one model, prompt set and machine, in one run (greedy, end-of-text held off, so every request makes exactly
``--tokens`` tokens; focus and routing on):

  (a) one request alone: the batched step (``HFBatchDecoder``, in the form warm-up chose with ``--compile``) against each request through its own forward
      (``RequestDecoder``, the path before it) and against plain ``model.generate``: decode tokens/s, paired
      repeats, the median of the ratios;
  (b) ``--concurrent`` requests at once against the same requests one after another: aggregate tokens/s, for the
      batched step and for the per-request path; every batched answer compared with its sequential twin.

``--model glm-scale`` (the default): ``assets/configs/glm-4.1v-scale-40l.json``, GLM-4.1V (the architecture of
AutoGLM-Phone-9B) at the 9B model's depth (40 layers) and its 151k vocabulary, at a small width, random weights
built at start-up; or ``random:PATH`` / a checkpoint directory. Ratios are what to quote from a CPU.
"""

from __future__ import annotations

import statistics
import time

import torch

from autoglm_app.config import ROOT
from autoglm_app.events import Answer, ChatRequest, Message, Options, Reasoning, Stats

GLM_SCALE = ROOT / "assets" / "configs" / "glm-4.1v-scale-40l.json"


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="a transformers family: batched step vs per request vs generate, N at once")
    b.add_argument("--model", default="glm-scale", help="glm-scale, random:PATH or a checkpoint directory")
    b.add_argument("--quantize", default="fp32")
    b.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="the batched step's --compile (auto: on a GPU only; warm-up keeps the faster of eager and "
                        "compiled, alone and at --concurrent rows)")
    b.add_argument("--tokens", type=int, default=48)
    b.add_argument("--concurrent", type=int, default=8)
    b.add_argument("--repeats", type=int, default=3)
    from pathlib import Path

    b.add_argument("--out", type=Path, default=Path("bench-results") / "batch.json")


def _request(i: int, tokens: int) -> ChatRequest:
    from tools.bench import bench_image

    text = ("Describe the image.", "What is the red shape?", "Where is the blue square?", "Count the shapes.")[i % 4]
    return ChatRequest([Message("user", text, [bench_image()])],
                       Options(temperature=0.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0, focus=True,
                               routing=True), session_id=f"bench-{i}")


def _text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, (Reasoning, Answer)))


def _stats(events) -> Stats:
    return next(e for e in events if isinstance(e, Stats))


@torch.inference_mode()
def _generate_tps(engine, tokens: int) -> float:
    """Decode tokens/s of ``model.generate`` on request 0's prompt: (tokens - 1) over the time past a one-token run."""
    rt = engine.rt
    prep = rt.family.prepare(rt.processor, _request(0, tokens).messages, True)
    inputs = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}

    def run(n: int) -> float:
        rt.family.begin(rt.model)
        t0 = time.perf_counter()
        rt.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    return (tokens - 1) / max(run(tokens) - run(1), 1e-9)


def run_batch_bench(model: str, quantize: str, tokens: int, concurrent: int, repeats: int,
                    compile_mode: str = "auto") -> dict:
    from autoglm_app.config import Limits, Settings
    from autoglm_app.engine.decoding import RequestDecoder
    from autoglm_app.server import load_engine

    path = f"random:{GLM_SCALE}" if model == "glm-scale" else model
    t0 = time.perf_counter()
    engine = load_engine(Settings(model=path, quantize=quantize, compile=compile_mode, max_batch=concurrent,
                                  random_seed=0, limits=Limits(max_queue=2 * concurrent, context_limit=1024)))
    load_s = time.perf_counter() - t0
    batched = engine.decoder
    per_request = RequestDecoder(engine.rt, concurrent)
    decoders = {"batched": batched, "per request": per_request}
    if not batched.batched:
        raise SystemExit(f"{model} has no batched step here: {batched.note}")

    def use(name: str) -> None:
        while not engine.idle:  # (swapped only between requests)
            time.sleep(0.01)
        engine.decoder = decoders[name]

    def alone(name: str) -> float:
        use(name)
        return _stats(engine.run(_request(0, tokens))).tokens_per_second

    try:
        for name in decoders:  # warm-up
            use(name)
            engine.run(_request(0, 8))
        _generate_tps(engine, 8)
        solo = {"batched": [], "per request": [], "generate": []}
        for _ in range(repeats):  # interleaved: drift in machine speed hits all three alike
            solo["batched"].append(alone("batched"))
            solo["per request"].append(alone("per request"))
            solo["generate"].append(_generate_tps(engine, tokens))
        requests = [_request(i, tokens) for i in range(concurrent)]
        runs: dict = {}
        for name in decoders:
            use(name)
            t0 = time.perf_counter()
            seq = [engine.run(r) for r in requests]
            seq_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            handles = [engine.submit(r) for r in requests]
            together = [list(h.events(timeout=600)) for h in handles]
            tog_s = time.perf_counter() - t0
            runs[name] = {"sequential_s": round(seq_s, 3), "concurrent_s": round(tog_s, 3),
                          "speedup": round(seq_s / tog_s, 2),
                          "aggregate_tok_s_concurrent": round(concurrent * tokens / tog_s, 1),
                          "identical": sum(_text(a) == _text(b) for a, b in zip(seq, together))}
        ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(solo[a], solo[b])), 2)  # noqa: E731
        text_cfg = getattr(engine.loaded.model.config, "text_config", engine.loaded.model.config)
        return {
            "model": engine.loaded.model_id, "quantize": quantize, "family": engine.rt.family.name,
            "layers": text_cfg.num_hidden_layers, "hidden": text_cfg.hidden_size, "tokens": tokens,
            "concurrent": concurrent, "repeats": repeats, "threads": torch.get_num_threads(),
            "load_s": round(load_s, 1), "compile": compile_mode, "step": batched.step_name,
            "step_ms": {k: round(v, 2) for k, v in batched.timings.items()}, "compile_warmup_s": round(batched.warmup_s, 1),
            "alone_tok_s": {k: [round(x, 1) for x in v] for k, v in solo.items()},
            "alone_batched_vs_per_request": ratio("batched", "per request"),
            "alone_batched_vs_generate": ratio("batched", "generate"),
            "alone_per_request_vs_generate": ratio("per request", "generate"),
            "runs": runs, "batched_vs_per_request_concurrent": round(
                runs["per request"]["concurrent_s"] / runs["batched"]["concurrent_s"], 2),
        }
    finally:
        engine.close()


def run_from_args(args) -> dict:
    return run_batch_bench(args.model, args.quantize, args.tokens, args.concurrent, args.repeats, args.compile)


def batch_table(r: dict) -> str:
    med = {k: statistics.median(v) for k, v in r["alone_tok_s"].items()}
    lines = [f"{r['model']} ({r['family']}, {r['layers']} layers, hidden {r['hidden']}, {r['quantize']}), "
             f"{r['tokens']} tokens, focus + routing on, {r['threads']} threads; loaded in {r['load_s']} s",
             f"step: {r['step']} (warm-up timed {r['step_ms'] or 'nothing: --compile off'}; compile and warm-up "
             f"{r['compile_warmup_s']} s)",
             "", "| one request alone | decode tok/s (median) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in med.items()]
    lines += [f"| batched / per request (paired) | {r['alone_batched_vs_per_request']} |",
              f"| batched / generate (paired) | {r['alone_batched_vs_generate']} |", "",
              f"| {r['concurrent']} requests | sequential s | concurrent s | speedup | aggregate tok/s | identical |",
              "|---|---|---|---|---|---|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {x['sequential_s']} | {x['concurrent_s']} | {x['speedup']}x | "
                     f"{x['aggregate_tok_s_concurrent']} | {x['identical']}/{r['concurrent']} |")
    lines.append(f"\n{r['concurrent']} at once, batched against per request: {r['batched_vs_per_request_concurrent']}x")
    return "\n".join(lines)
