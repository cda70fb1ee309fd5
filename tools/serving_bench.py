"""``python -m tools.bench serving``: decoding through ``/v1`` with the openai SDK, against a server started
here on loopback (the page mounted too, as ``python app.py`` serves it).

Every request makes exactly ``--tokens`` tokens (``min_tokens`` = ``max_tokens``, vLLM's way to fix the length).
(a) telemetry cost: one streamed greedy request at a time, with ``return_focus`` + ``return_routing`` and
    without, interleaved; each request's decode rate is (chunks after the first) / (time from the first
    to the last chunk), as a client sees it. Target: with / without >= 0.95.
(b) continuous batching: N different greedy streamed requests one after another, then the same N at once
    (one thread each), BATCH_PAIRS times (the median pair is reported); aggregate tokens/s = completion tokens / wall
    time. Target >= 4x at N = 8, every
    concurrent answer identical to its sequential twin.
Ratios are what to quote from a CPU; absolute figures only from a GPU. The server runs as ``python app.py`` in a
child process, so the clients' own work (parsing the streams) does not share its interpreter.
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
    times, text, chunks, server_tps = [], [], 0, None
    stream = client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens,
                                            temperature=0, seed=0, stream=True,
                                            extra_body={**extra, "min_tokens": max_tokens, "return_stats": True})
    for chunk in stream:
        stats = (chunk.model_extra or {}).get("stats")
        if stats:  # the engine's own decode rate (the last chunk's): what the server did, whatever the client costs
            server_tps = stats["tokens_per_second"]
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
            "decode_tps": (chunks - 1) / span if span > 0 else 0.0, "server_tps": server_tps,
            "end": time.perf_counter()}


def completion_tokens(client, model: str, i: int, max_tokens: int) -> int:
    r = client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens, temperature=0,
                                       seed=0, extra_body={"min_tokens": max_tokens})
    return r.usage.completion_tokens


def run_serving_bench(model_path: str, compile_mode: str, tokens: int, repeats: int, concurrent: int) -> dict:
    """The server is ``python app.py`` in a child process (its own interpreter: the clients here parse their
    streams without taking the server's interpreter lock, as real clients do)."""
    import tempfile
    from pathlib import Path

    import httpx
    from openai import OpenAI

    from tools.fullsize_cpu import start_server, wait_ready

    log = Path(tempfile.mkdtemp(prefix="autoglm-serving-")) / "server.log"
    t0 = time.perf_counter()
    proc, url = start_server(model_path, None, log, ["--compile", compile_mode, "--max-batch", str(concurrent)],
                             {"AUTOGLM_COMPILE": compile_mode})
    try:
        wait_ready(proc, url, 900)
        load_s = time.perf_counter() - t0
        client = OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=300)
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        for i in range(2):  # warm up both paths
            stream_one(client, model, i, tokens, True)
            stream_one(client, model, i, tokens, False)
        on, off, server_on, server_off = [], [], [], []
        for r in range(repeats):  # interleaved, each pair in a turning order, so drift hits both alike
            for telemetry in ((False, True) if r % 2 == 0 else (True, False)):
                got = stream_one(client, model, r % len(QUESTIONS), tokens, telemetry)
                (on if telemetry else off).append(got["decode_tps"])
                (server_on if telemetry else server_off).append(got["server_tps"])

        n = concurrent
        usage = [completion_tokens(client, model, i, tokens) for i in range(n)]
        pairs, identical = [], 0
        for _ in range(BATCH_PAIRS):  # the N one after another, then at once: a speed-up per pair
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
            identical += sum(a["text"] == b["text"] for a, b in zip(sequential, together))
            pairs.append((seq_s, conc_s, together))
        decoding = decoding_line(log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
    info = {"model": info.get("id"), "step": decoding}
    med = statistics.median
    total = sum(usage)
    seq_s, conc_s, together = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]  # the median pair
    return {
        "model": model, "compile": compile_mode, "decoding": info, "max_batch": concurrent, "load_s": round(load_s, 1),
        "tokens": tokens, "repeats": repeats,
        "decode_tps_plain": round(med(off), 1), "decode_tps_focus_routing": round(med(on), 1),
        "ratio_focus_routing_vs_plain": round(med(on) / med(off), 3),
        "paired_ratio_focus_routing_vs_plain": round(med([a / b for a, b in zip(on, off)]), 3),
        # the same ratio from the engine's own decode rate (Stats.tokens_per_second): the server's share of the cost
        "server_ratio_focus_routing_vs_plain": round(med(server_on) / med(server_off), 3),
        "server_paired_ratio_focus_routing_vs_plain": round(med([a / b for a, b in zip(server_on, server_off)]), 3),
        "concurrent": n, "completion_tokens": total,
        "sequential_s": round(seq_s, 2), "concurrent_s": round(conc_s, 2),
        "sequential_tps": round(total / seq_s, 1), "concurrent_tps": round(total / conc_s, 1),
        "aggregate_speedup": round(seq_s / conc_s, 2),
        "speedups": [round(a / b, 2) for a, b, _ in pairs],
        "identical_answers": f"{identical}/{n * len(pairs)}",
        "median_ttft_concurrent_ms": round(1000 * med(r["ttft_s"] for r in together), 1),
        "raw": {"on": on, "off": off, "server_on": server_on, "server_off": server_off},
    }


BATCH_PAIRS = 3  # sequential / concurrent pairs; the median pair's figures are reported


def serving_table(r: dict) -> str:
    step = r["decoding"].get("step", "")
    return "\n".join([
        f"model {r['model']} through /v1 of python app.py (openai SDK in another process, streamed, greedy, "
        f"max_tokens {r['tokens']}), compile {r['compile']}, max batch {r['max_batch']}; median of {r['repeats']}",
        f"step: {step}",
        "| measure | value | target |",
        "|---|---|---|",
        f"| decode tok/s, plain | {r['decode_tps_plain']} | |",
        f"| decode tok/s, return_focus + return_routing | {r['decode_tps_focus_routing']} | |",
        f"| with / without telemetry: of the medians; within each pair, median | {r['ratio_focus_routing_vs_plain']}; "
        f"{r['paired_ratio_focus_routing_vs_plain']} | ≥ 0.95 |",
        f"| the same, from the engine's own decode rate (the server's side of it) | "
        f"{r['server_ratio_focus_routing_vs_plain']}; {r['server_paired_ratio_focus_routing_vs_plain']} | |",
        f"| {r['concurrent']} requests one after another: tok/s | {r['sequential_tps']} ({r['sequential_s']} s) | |",
        f"| the same {r['concurrent']} at once: aggregate tok/s | {r['concurrent_tps']} ({r['concurrent_s']} s) | |",
        f"| aggregate speed-up (the median of {len(r['speedups'])} pairs: {r['speedups']}) | {r['aggregate_speedup']}x "
        f"| ≥ 4x |",
        f"| concurrent answers identical to sequential | {r['identical_answers']} | all |",
        f"| median TTFT of the concurrent ones | {r['median_ttft_concurrent_ms']} ms | |",
    ])


def decoding_line(log_path) -> str:
    """The server's log line saying which decode step it kept (and the forms' times), if it wrote one."""
    try:
        lines = [line for line in open(log_path) if "decode step:" in line]
    except OSError:
        return ""
    return lines[-1].split("decode step:", 1)[1].strip() if lines else "eager (not compiled)"
