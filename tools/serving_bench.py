"""``python -m tools.bench serving``: decoding through ``/v1`` with the openai SDK, against a server started
here on loopback (the page mounted too, as ``python app.py`` serves it).

(a) telemetry cost: one streamed greedy request at a time, with ``return_focus`` + ``return_routing`` and
    without, interleaved; each request's decode rate is (chunks after the first) / (time from the first
    to the last chunk), as a client sees it. Target: with / without >= 0.95.
(b) continuous batching: N different greedy streamed requests one after another, then the same N at once
    (one thread each); aggregate tokens/s = completion tokens / wall time. Target >= 4x at N = 8, every
    concurrent answer identical to its sequential twin.
Ratios are what to quote from a CPU; absolute figures only from a GPU.
"""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time

from PIL import Image


def _image_url(seed: int) -> str:
    img = Image.new("RGB", (128, 128), (236, 234, 228))
    colors = [(210, 40, 40), (40, 60, 210), (40, 170, 60), (230, 200, 40)]
    img.paste(colors[seed % 4], (10 + 7 * seed % 50, 12, 60 + 7 * seed % 50, 62))
    img.paste(colors[(seed + 1) % 4], (70, 70 - seed % 30, 118, 118 - seed % 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


QUESTIONS = ["Describe the image.", "How many shapes are there?", "What color is the square?",
             "Is there a red circle?", "Where is the blue shape?", "What shapes do you see?",
             "Which shape is at the top left?", "Who are you?"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(i)}},
                                         {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]


def stream_one(client, model: str, i: int, max_tokens: int, telemetry: bool) -> dict:
    """One streamed greedy request: its text, chunk count and client-side decode rate."""
    extra = {"return_focus": True, "return_routing": True} if telemetry else {}
    t0 = time.perf_counter()
    times, text, chunks = [], [], 0
    stream = client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens,
                                            temperature=0, seed=0, stream=True, extra_body=extra)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (getattr(delta, "content", None) or "") + (getattr(delta, "reasoning_content", None) or "")
        if piece:
            times.append(time.perf_counter())
            text.append(piece)
            chunks += 1
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"text": "".join(text), "chunks": chunks, "ttft_s": times[0] - t0 if times else None,
            "decode_tps": (chunks - 1) / span if span > 0 else 0.0, "end": time.perf_counter()}


def completion_tokens(client, model: str, i: int, max_tokens: int) -> int:
    r = client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens, temperature=0,
                                       seed=0)
    return r.usage.completion_tokens


def run_serving_bench(model_path: str, compile_mode: str, tokens: int, repeats: int, concurrent: int) -> dict:
    from openai import OpenAI

    from autoglm_app.config import Settings
    from autoglm_app.server import create_app, load_engine, serve_in_thread

    settings = Settings(model=model_path, compile=compile_mode, max_batch=concurrent)
    t0 = time.perf_counter()
    engine = load_engine(settings)
    load_s = time.perf_counter() - t0
    server = serve_in_thread(create_app(engine, settings))
    client = OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0, timeout=300)
    model = engine.info()["model_id"]
    try:
        for i in range(2):  # warm up both paths
            stream_one(client, model, i, tokens, True)
            stream_one(client, model, i, tokens, False)
        on, off = [], []
        for r in range(repeats):  # interleaved, so drift in machine speed hits both alike
            off.append(stream_one(client, model, r % len(QUESTIONS), tokens, False)["decode_tps"])
            on.append(stream_one(client, model, r % len(QUESTIONS), tokens, True)["decode_tps"])

        n = concurrent
        usage = [completion_tokens(client, model, i, tokens) for i in range(n)]
        t_seq = time.perf_counter()
        sequential = [stream_one(client, model, i, tokens, False) for i in range(n)]
        seq_s = time.perf_counter() - t_seq
        together: list = [None] * n

        def worker(i: int) -> None:
            together[i] = stream_one(client, model, i, tokens, False)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        t_conc = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        conc_s = max(r["end"] for r in together) - t_conc
        identical = sum(a["text"] == b["text"] for a, b in zip(sequential, together))
        info = engine.info()["decoding"]
    finally:
        server.stop()
        engine.close()
    med = statistics.median
    total = sum(usage)
    return {
        "model": model, "compile": compile_mode, "decoding": info, "load_s": round(load_s, 1),
        "tokens": tokens, "repeats": repeats,
        "decode_tps_plain": round(med(off), 1), "decode_tps_focus_routing": round(med(on), 1),
        "ratio_focus_routing_vs_plain": round(med(on) / med(off), 3),
        "concurrent": n, "completion_tokens": total,
        "sequential_s": round(seq_s, 2), "concurrent_s": round(conc_s, 2),
        "sequential_tps": round(total / seq_s, 1), "concurrent_tps": round(total / conc_s, 1),
        "aggregate_speedup": round(seq_s / conc_s, 2),
        "identical_answers": f"{identical}/{n}",
        "median_ttft_concurrent_ms": round(1000 * med(r["ttft_s"] for r in together), 1),
        "raw": {"on": on, "off": off},
    }


def serving_table(r: dict) -> str:
    d = r["decoding"]
    step = d.get("step", "")
    return "\n".join([
        f"model {r['model']} through /v1 (openai SDK, streamed, greedy, max_tokens {r['tokens']}), step: {step}, "
        f"compile {r['compile']}, max batch {d['max_batch']}; median of {r['repeats']}",
        "| measure | value | target |",
        "|---|---|---|",
        f"| decode tok/s, plain | {r['decode_tps_plain']} | |",
        f"| decode tok/s, return_focus + return_routing | {r['decode_tps_focus_routing']} | |",
        f"| with / without telemetry | {r['ratio_focus_routing_vs_plain']} | ≥ 0.95 |",
        f"| {r['concurrent']} requests one after another: tok/s | {r['sequential_tps']} ({r['sequential_s']} s) | |",
        f"| the same {r['concurrent']} at once: aggregate tok/s | {r['concurrent_tps']} ({r['concurrent_s']} s) | |",
        f"| aggregate speed-up | {r['aggregate_speedup']}x | ≥ 4x |",
        f"| concurrent answers identical to sequential | {r['identical_answers']} | all |",
        f"| median TTFT of the concurrent ones | {r['median_ttft_concurrent_ms']} ms | |",
    ])
