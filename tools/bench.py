"""The engine benchmark: prints a table, writes JSON. Never run as a timed test.

    python -m tools.bench engine [--model DIR] [--quantize fp32|int4] [--tokens 64] [--repeats 5]

engine: in one run on one machine, on the same model and prompt, greedy decoding with
end-of-text suppressed so every run makes exactly ``--tokens`` tokens:
  (a) the engine with probes off against plain ``model.generate``  (target ratio >= 0.95)
  (b) the engine with focus + routing probes on against off          (target overhead <= 10%)
  (c) time to first token with one image, thinking on
Ratios are what to quote from a CPU (machines are noisy); absolute times only from a GPU.

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

from autoglm_app.config import default_model
from autoglm_app.engine.worker import Engine
from autoglm_app.events import ChatRequest, Message, Options, Stats
from autoglm_app.families import AUTOGLM

log = logging.getLogger("autoglm.bench")


def bench_image() -> Image.Image:
    img = Image.new("RGB", (224, 224), (236, 234, 228))
    img.paste((210, 40, 40), (20, 20, 80, 80))
    img.paste((40, 60, 210), (140, 130, 200, 190))
    return img


def engine_request(tokens: int, probes: bool, image: bool = True) -> ChatRequest:
    msg = Message("user", "Describe the image.", [bench_image()] if image else [])
    return ChatRequest([msg], Options(temperature=0.0, max_new_tokens=tokens, min_new_tokens=tokens, seed=0,
                                      focus=probes, routing=probes, enable_thinking=True))


def time_engine(engine: Engine, tokens: int, probes: bool) -> tuple[float, Stats]:
    t0 = time.perf_counter()
    stats = [e for e in engine.run(engine_request(tokens, probes)) if isinstance(e, Stats)][0]
    elapsed = time.perf_counter() - t0
    assert stats.completion_tokens == tokens, stats
    return tokens / elapsed, stats


@torch.inference_mode()
def time_generate(model, processor, tokens: int) -> float:
    prep = AUTOGLM.prepare(processor, engine_request(tokens, False).messages, True)
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in prep.inputs.items()}
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return tokens / elapsed


def run_engine_bench(model_path: str, quantize: str | None, tokens: int, repeats: int) -> dict:
    from autoglm_app.server import load_engine
    from autoglm_app.config import Settings

    engine = load_engine(Settings(model=model_path, quantize=quantize))
    model, processor = engine.loaded.model, engine.loaded.processor
    try:
        time_engine(engine, 8, True)  # warm up both paths
        time_generate(model, processor, 8)
        gen, off, on, ttft = [], [], [], []
        for _ in range(repeats):  # interleaved, so drift in machine speed hits all three alike
            gen.append(time_generate(model, processor, tokens))
            tps, _ = time_engine(engine, tokens, False)
            off.append(tps)
            tps, stats = time_engine(engine, tokens, True)
            on.append(tps)
            ttft.append(stats.ttft_s)
    finally:
        engine.close()
    med = statistics.median
    return {
        "model": engine.loaded.model_id,
        "quantize": engine.loaded.quantize,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tokens": tokens,
        "repeats": repeats,
        "generate_tokens_per_s": round(med(gen), 1),
        "engine_probes_off_tokens_per_s": round(med(off), 1),
        "engine_probes_on_tokens_per_s": round(med(on), 1),
        "ratio_engine_off_vs_generate": round(med(off) / med(gen), 3),
        "probe_overhead": round(1 - med(on) / med(off), 3),
        "ttft_one_image_thinking_ms": round(1000 * med(ttft), 1),
        "raw": {"generate": gen, "engine_off": off, "engine_on": on, "ttft_s": ttft},
    }


def engine_table(r: dict) -> str:
    return "\n".join([
        f"model {r['model']} ({r['quantize']}) on {r['device']}, {r['tokens']} tokens, median of {r['repeats']}",
        "| measure | value | target |",
        "|---|---|---|",
        f"| model.generate, tokens/s | {r['generate_tokens_per_s']} | |",
        f"| engine, probes off, tokens/s | {r['engine_probes_off_tokens_per_s']} | |",
        f"| engine, probes on, tokens/s | {r['engine_probes_on_tokens_per_s']} | |",
        f"| (a) engine off / generate | {r['ratio_engine_off_vs_generate']} | ≥ 0.95 |",
        f"| (b) probe overhead (1 - on/off) | {r['probe_overhead']:.1%} | ≤ 10% |",
        f"| (c) TTFT, one image, thinking on | {r['ttft_one_image_thinking_ms']} ms | |",
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine", help="engine vs generate, probe overhead, TTFT")
    e.add_argument("--model", default=default_model())
    e.add_argument("--quantize", default=None)
    e.add_argument("--tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--out", type=Path, default=Path("bench-results") / "engine.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_engine_bench(args.model, args.quantize, args.tokens, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(engine_table(result))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
