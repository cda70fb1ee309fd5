"""``python -m tools.fullsize_cpu [--model NAME ...] [--tokens 4]``: a full-size random model in int4, served end to end on this machine.

For each ``--model`` (default: the AutoGLM-Phone-9B and GLM-4.1V-9B-Thinking configs in assets/configs):
``python app.py --model random:NAME --quantize int4`` in a child process on loopback; its resident memory
sampled every 0.2 s (psutil) from the start to the end, so the load's peak and the steady figure after it are
the server's own; the load time until ``/health`` says ready; the plan's bytes for the same config
(``loading.planning``: exact NF4 accounting) and the process's baseline (the same server started on the
shipped demo model, which holds a few MB of weights: torch, transformers, gradio and the page themselves);
then one short image turn through ``/v1`` (openai SDK, ``return_focus`` + ``return_routing``, streamed) and one
through the page (gradio_client ``/chat``), each timed, seconds per token from the stream. Table + JSON.

The build is bitsandbytes' CPU NF4 packing of ~8 billion values (minutes on two cores) and the decode runs
bitsandbytes' CPU 4-bit kernels: seconds per token. Run nothing else beside it.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

from autoglm_app.config import ROOT

DEFAULT_MODELS = ("autoglm-phone-9b", "glm-4.1v-9b-thinking")


class Sampler(threading.Thread):
    """RSS of one process (and its children) every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.proc, self.every = psutil.Process(pid), every
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.rss()))
            except psutil.Error:
                return
            self.stop_event.wait(self.every)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max((v for t, v in self.samples if since <= t <= until), default=0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, quantize: str | None, log_path: Path, extra: list[str] | None = None,
                 env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on ``model`` in a child process on a free loopback port: (process, base URL)."""
    port = free_port()
    args = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--model", model]
    if quantize:
        args += ["--quantize", quantize]
    args += extra or []
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1",
           **(env_extra or {})}
    log = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while loading")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {timeout_s} s")


def image_data_url() -> str:
    img = Image.new("RGB", (336, 336), (236, 234, 228))
    img.paste((210, 40, 40), (30, 30, 150, 150))
    img.paste((40, 60, 210), (190, 180, 310, 300))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def api_turn(url: str, model: str, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}},
                                         {"type": "text", "text": "Describe the image."}]}]
    t0 = time.monotonic()
    times, focus, routing, usage = [], 0, 0, None
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_focus": True, "return_routing": True})
    for chunk in stream:
        data = chunk.model_dump()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                times.append(time.monotonic())
            focus += delta.get("focus") is not None
            routing += delta.get("routing") is not None
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"ttft_s": round(times[0] - t0, 2) if times else None, "chunks": len(times), "completion_tokens": usage,
            "s_per_token": round(span / (len(times) - 1), 2) if len(times) > 1 else None,
            "focus_records": focus, "routing_records": routing, "total_s": round(time.monotonic() - t0, 1)}


def page_turn(url: str, tokens: int, workdir: Path) -> dict:
    from gradio_client import Client, handle_file

    path = workdir / "scene.png"
    Image.open(io.BytesIO(base64.b64decode(image_data_url().split(",", 1)[1]))).save(path)
    client = Client(url + "/", verbose=False)
    t0 = time.monotonic()
    history = client.predict("Describe the image.", [handle_file(str(path))], None, True, 0.0, 0.9, tokens, 0,
                             api_name="/chat")
    return {"total_s": round(time.monotonic() - t0, 1), "messages": len(history or [])}


def kv_bytes(log_path: Path) -> int:
    """The KV cache the engine allocated, from its start-up line (0 when it has none: per-request caches)."""
    import re

    text = log_path.read_text(errors="replace")
    m = re.search(r"decoding: (.*?), KV cache .*?\(kv_bytes=(\d+)\)", text)
    return int(m.group(2)) if m and m.group(1).startswith("one batched") else 0


def plan_bytes(name: str) -> int:
    from autoglm_app.loading.planning import build_on_meta, estimate_module_bytes, load_config

    path = ROOT / "assets" / "configs" / f"{name}.json"
    return int(sum(estimate_module_bytes(build_on_meta(load_config(str(path))), "int4").values()))


def measure(model: str, quantize: str | None, tokens: int, workdir: Path, timeout_s: float) -> dict:
    log_path = workdir / f"{model.replace(':', '_').replace('/', '_')}.log"
    proc, url = start_server(model, quantize, log_path)
    sampler = Sampler(proc.pid)
    sampler.start()
    row: dict = {"model": model}
    try:
        load_s = wait_ready(proc, url, timeout_s)
        loaded_at = sampler.samples[-1][0] if sampler.samples else 0.0
        time.sleep(2)
        row.update(load_s=round(load_s, 1), peak_load_rss=sampler.peak(until=loaded_at + 0.5),
                   steady_rss=sampler.rss(), kv_bytes=kv_bytes(log_path))
        if tokens:
            served = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            row["api"] = api_turn(url, served, tokens)
            row["page"] = page_turn(url, tokens, workdir)
            row["after_turns_rss"] = sampler.rss()
            row["peak_rss"] = sampler.peak()
    finally:
        sampler.stop_event.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return row


def run_fullsize(models: list[str], tokens: int, timeout_s: float) -> dict:
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="autoglm-fullsize-"))
    baseline = measure(str(ROOT / "assets" / "autoglm-phone-tiny"), None, 0, workdir, 300)
    rows = []
    for name in models:
        row = measure(f"random:{name}", "int4", tokens, workdir, timeout_s)
        row["plan_bytes"] = plan_bytes(name)
        row["baseline_rss"] = baseline["steady_rss"]
        expected = row["plan_bytes"] + row["kv_bytes"] + baseline["steady_rss"]
        row["steady_over_expected"] = round(row["steady_rss"] / expected, 3)
        row["peak_over_expected"] = round(row.get("peak_rss", row["peak_load_rss"]) / expected, 3)
        rows.append(row)
    return {"machine": f"{psutil.cpu_count(logical=False)} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "tokens": tokens, "baseline": baseline, "rows": rows, "logs": str(workdir)}


def fullsize_table(r: dict) -> str:
    gib = 2**30
    lines = [f"full-size random models in int4 on the CPU ({r['machine']}); baseline: the same server on the demo "
             f"model, steady {r['baseline']['steady_rss'] / gib:.2f} GiB; turns of {r['tokens']} tokens", "",
             "| model | plan (weights) | KV cache (slots) | load | peak RSS while loading | steady RSS | "
             "steady / (plan + KV + baseline) | /v1 turn: TTFT, s/token, focus / routing records | page turn | "
             "RSS after the turns | peak / (plan + KV + baseline) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        api, page = row.get("api", {}), row.get("page", {})
        lines.append(
            f"| {row['model']} | {row['plan_bytes'] / gib:.2f} GiB | {row['kv_bytes'] / gib:.2f} GiB | {row['load_s']} s | "
            f"{row['peak_load_rss'] / gib:.2f} GiB | {row['steady_rss'] / gib:.2f} GiB | "
            f"{row['steady_over_expected']} | {api.get('ttft_s')} s, {api.get('s_per_token')} s, "
            f"{api.get('focus_records')} / {api.get('routing_records')} | {page.get('total_s')} s | "
            f"{row.get('after_turns_rss', 0) / gib:.2f} GiB | {row['peak_over_expected']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a config name in assets/configs (repeatable); default: "
                                                    + ", ".join(DEFAULT_MODELS))
    p.add_argument("--tokens", type=int, default=4, help="max_tokens of each turn")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a load may take")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "fullsize_cpu.json")
    args = p.parse_args(argv)
    result = run_fullsize(args.model or list(DEFAULT_MODELS), args.tokens, args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(fullsize_table(result))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
