"""Load test: concurrent clients mixing UI and API traffic, bad requests and mid-stream disconnects.

    python -m tools.bench load [--clients 16] [--duration 120] [--bad 0.1] [--disconnect 0.1]
                                     [--ui 0.25] [--max-requests N] [--seed 0] [--max-tokens 48]
                                     [--spawn | --url http://127.0.0.1:8000 [--pid PID] [--api-key KEY]]
                                     [--out bench-results/load.json]

Loopback only, bounded in count (``--max-requests``) and time (``--duration``, plus a per-request
timeout). Without ``--url`` the app (UI + API, the demo model) is started on a free 127.0.0.1 port:
in this process (default) or as a ``python app.py`` child process (``--spawn``, so the resident
memory measured is the server's alone). The server started here requires an API key, so wrong
keys can be tried.

What each client thread does, until the deadline or the shared request budget runs out:

* good requests, answered at temperature 0 with a fixed seed from a fixed pool of ShapesWorld
  questions (an image and a question such as "How many shapes are there?"; thinking on and off):
  ``api_stream`` (SSE), ``api_json`` (non-streamed), ``ui_chat`` (the page's ``/chat`` endpoint
  through gradio_client, after ``/clear``). "Answered correctly" means well formed, complete, and
  identical (reasoning, answer, finish reason) to the reference the same pool item got when run
  alone during warm-up — the demo model answers about half of ShapesWorld questions right, so the
  scene's truth is not the yardstick; determinism under load is.
* bad requests that must be refused with a 4xx OpenAI error object: malformed JSON, undecodable
  base64 image, unknown content part, temperature out of range, ``n=2``, ``max_tokens=0``, a prompt
  over the context, an unknown model, a wrong API key (when a key is known), and an empty UI turn
  (a readable gradio error).
* disconnects: a raw socket that sends a streaming request and closes at once, and SSE streams
  closed after the first chunk or after the first token.

Every outcome is one of ``ok_correct``, ``ok_mismatch`` (well formed, not the reference),
``bad_request_rejected``, ``bad_request_accepted``, ``busy`` (429/503 with Retry-After; the
client backs off, bounded), ``disconnect_done`` and ``server_error`` (a 5xx other than busy, a
connection failure, a timeout, a malformed answer or an error event inside a good stream).
Time to first token (first reasoning or answer delta) is measured on good streams; resident
memory (VmRSS) at start, after warm-up, during the run and at the end. After the run /health
and one good request are checked again.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("autoglm.loadtest")

GOOD_KINDS = ("api_stream", "api_json", "ui_chat")
BAD_KINDS = ("bad_json", "bad_base64", "bad_part", "bad_temperature", "bad_n", "bad_max_tokens",
             "bad_long_prompt", "bad_model", "bad_key", "ui_empty")
DISCONNECT_KINDS = ("disconnect_raw", "disconnect_first_chunk", "disconnect_first_token")
OUTCOMES = ("ok_correct", "ok_mismatch", "bad_request_rejected", "bad_request_accepted", "busy",
            "disconnect_done", "server_error")
POOL_TASKS = ("count", "color", "where", "exists", "describe", "identity", "count", "color")
MODEL_NAME = "autoglm-phone-9b"
BACKOFF_CAP_S = 3.0


# ----------------------------------------------------------------------------- configuration


@dataclass
class LoadConfig:
    clients: int = 16
    duration: float = 120.0
    bad: float = 0.1
    disconnect: float = 0.1
    ui: float = 0.25  # share of the good requests that go through the UI
    json_share: float = 0.25  # share of the good API requests that are not streamed
    max_requests: int | None = None
    seed: int = 0
    max_tokens: int = 48
    pool: int = 8
    warm_burst: int = 2  # good requests per client, all at once, before RSS "after warm-up"
    cover: bool = True  # the first requests cover every kind once
    request_timeout: float = 60.0
    url: str | None = None  # an already-running server; None: start one here
    pid: int | None = None  # that server's process id, for its resident memory
    api_key: str | None = None  # the key the target server wants (a server started here gets one)
    spawn: bool = False  # start the server as a child process instead of in this process
    model: str | None = None  # None: config.default_model()
    context_limit: int = 8192  # for the too-long prompt
    api_user: bool = False  # good API requests carry user=<client> (one engine session per client, like the UI)
    out: str | None = None


# ----------------------------------------------------------------------------- the request pool


@dataclass
class PoolItem:
    index: int
    task: str
    question: str
    truth: str  # the ShapesWorld answer (for information only)
    thinking: bool
    png: bytes | None
    image_path: str | None = None
    api_ref: tuple | None = None  # (reasoning, answer, finish) from a lone non-streamed request
    ui_ref: list | None = None  # the UI's assistant messages for a lone /chat

    def content(self) -> list | str:
        if self.png is None:
            return self.question
        url = "data:image/png;base64," + base64.b64encode(self.png).decode()
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.question}]


def make_pool(n: int, seed: int, image_dir: Path) -> list[PoolItem]:
    from training.shapesworld import make_qa, random_scene, render

    rng = random.Random(seed)
    pool = []
    for i in range(n):
        task = POOL_TASKS[i % len(POOL_TASKS)]
        scene = random_scene(rng, rng.choice((128, 160, 192, 224)))
        qa = make_qa(scene, rng, task)
        png = path = None
        if task != "identity":  # identity questions go text-only: the text path is exercised too
            buf = io.BytesIO()
            render(scene).save(buf, "PNG")
            png = buf.getvalue()
            path = str(image_dir / f"scene{i}.png")
            Path(path).write_bytes(png)
        pool.append(PoolItem(i, task, qa.question, qa.answer, thinking=(i % 2 == 0), png=png, image_path=path))
    return pool


def body_for(item: PoolItem, stream: bool, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": item.content()}], "temperature": 0.0,
            "seed": 0, "max_tokens": max_tokens, "enable_thinking": item.thinking, "stream": stream}
    body.update(extra)
    return body


# ----------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    kind: str
    outcome: str
    status: int | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    detail: str = ""
    retry_after: float | None = None
    client: int = -1
    t: float = 0.0  # seconds since the start of the run


class Malformed(Exception):
    """The server's answer is not what the protocol promises."""


def error_object_ok(payload) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err.get("message")) \
        and isinstance(err.get("type"), str)


def retry_after_of(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify_refusal(kind: str, response, body: bytes) -> Outcome | None:
    """A non-200 answer: busy, the expected 4xx, or a server error. None for 200."""
    status = response.status_code
    if status == 200:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if status in (429, 503):
        ra = retry_after_of(response)
        if ra is None or not error_object_ok(payload):
            return Outcome(kind, "server_error", status, detail="busy answer without Retry-After or error object")
        return Outcome(kind, "busy", status, retry_after=ra)
    if 400 <= status < 500:
        if not error_object_ok(payload):
            return Outcome(kind, "server_error", status,
                           detail=f"{status} without an OpenAI error object: {body[:200]!r}")
        if kind in BAD_KINDS:
            return Outcome(kind, "bad_request_rejected", status, detail=payload["error"].get("code") or "")
        return Outcome(kind, "server_error", status,
                       detail=f"good request refused: {payload['error']['message'][:200]}")
    return Outcome(kind, "server_error", status, detail=f"HTTP {status}: {body[:200]!r}")


@dataclass
class StreamRead:
    role: bool = False
    reasoning: str = ""
    content: str = ""
    finish: str | None = None
    done: bool = False
    errors: list = field(default_factory=list)
    ttft_s: float | None = None
    chunks: int = 0

    def signature(self) -> tuple:
        return (self.reasoning, self.content, self.finish)


def read_sse(response, t0: float, stop: str | None = None) -> StreamRead:
    """Parse an SSE chat stream; ``stop`` = 'first_chunk' / 'first_token' returns early."""
    r = StreamRead()
    for line in response.iter_lines():
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data: "):
            raise Malformed(f"not an SSE data line: {line[:120]!r}")
        data = line[6:]
        if data == "[DONE]":
            r.done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            raise Malformed(f"SSE data is not JSON: {data[:120]!r}") from None
        r.chunks += 1
        if "error" in obj:
            r.errors.append(obj["error"])
            continue
        if obj.get("object") != "chat.completion.chunk":
            raise Malformed(f"not a chat.completion.chunk: {data[:120]!r}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("role") == "assistant":
                r.role = True
            text, thought = delta.get("content"), delta.get("reasoning_content")
            if (text or thought) and r.ttft_s is None:
                r.ttft_s = time.perf_counter() - t0
            r.content += text or ""
            r.reasoning += thought or ""
            if choice.get("finish_reason"):
                r.finish = choice["finish_reason"]
        if stop == "first_chunk" or (stop == "first_token" and r.ttft_s is not None):
            break
    return r


def ui_signature(history) -> list:
    """The assistant side of a UI /chat answer: [(title or '', content)], durations left out."""
    out = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif isinstance(content, dict):
            content = content.get("text", json.dumps(content, sort_keys=True))
        meta = m.get("metadata") or {}
        out.append([meta.get("title") or "", str(content or ""), meta.get("status") or ""])
    return out


def ui_problem(sig: list) -> str | None:
    """What is wrong with a finished UI answer (None: complete and well formed)."""
    if not sig:
        return "no assistant message"
    for title, content, status in sig:
        if content.startswith("**Error:**"):
            return content
        if title and status == "pending":
            return f"{title!r} still pending at the end"
    last_title, last_content, _ = sig[-1]
    if last_title or not last_content.strip():
        return "the last message is not an answer"
    return None


# ----------------------------------------------------------------------------- memory


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of a process (None: this one); None when it cannot be read."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


class RSSSampler(threading.Thread):
    def __init__(self, pid: int | None, every: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            value = rss_bytes(self.pid)
            if value is not None:
                self.samples.append((round(time.monotonic() - self.t0, 1), value))
            self.stop_event.wait(self.every)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class ErrorLogCounter(logging.Handler):
    """Counts ERROR (and worse) log records of the in-process server."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 10:
            self.samples.append(f"{record.name}: {record.getMessage()[:300]}")


# ----------------------------------------------------------------------------- the server under test


@dataclass
class Target:
    url: str
    api_key: str | None
    pid: int | None  # None with in_process: this process
    in_process: bool
    context_limit: int
    engine: object = None
    stop: object = None
    log_path: str | None = None
    errors: ErrorLogCounter | None = None
    model_id: str | None = None

    def rss(self) -> int | None:
        if self.in_process:
            return rss_bytes(None)
        return rss_bytes(self.pid) if self.pid else None

    def log_errors(self) -> tuple[int, list[str]]:
        if self.errors is not None:
            return self.errors.count, self.errors.samples
        if self.log_path and Path(self.log_path).exists():
            return scan_server_log(Path(self.log_path).read_text(errors="replace"))
        return 0, []


READABLE_UI_ERROR = "gradio.exceptions.Error:"  # gr.Error: the page's readable refusal, which gradio prints


def scan_server_log(text: str) -> tuple[int, list[str]]:
    """ERROR log lines and tracebacks in a server log, as (count, samples).

    A traceback chain ("The above exception was the direct cause ...") counts once, by its last
    exception line; chains ending in gr.Error are the UI's readable refusals (gradio prints them
    to stderr) and are not counted.
    """
    found: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("Traceback (most recent call last)"):
            last = ""
            i += 1
            while i < len(lines):
                cur = lines[i]
                if cur.startswith((" ", "\t")) or not cur.strip() or cur.startswith("Traceback") \
                        or cur.startswith(("The above exception", "During handling")):
                    i += 1
                    continue
                last = cur  # the exception line ends the block; a chained block may follow
                i += 1
                if i < len(lines) and (not lines[i].strip() or lines[i].startswith(("The above", "During"))):
                    continue
                break
            if not last.startswith(READABLE_UI_ERROR):
                found.append("traceback: " + last[:300])
            continue
        if " ERROR " in line or line.startswith("ERROR"):
            found.append(line[:300])
        i += 1
    return len(found), found[:10]


def loopback_only(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"the load test only targets loopback (127.0.0.1), not {host!r}")
    return url.rstrip("/")


def wait_healthy(url: str, timeout: float, proc=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")


def start_target(cfg: LoadConfig, workdir: Path) -> Target:
    from autoglm_app.config import ROOT, Settings, default_model
    from autoglm_app.server import free_port

    if cfg.url:
        return Target(loopback_only(cfg.url), cfg.api_key, cfg.pid, False, cfg.context_limit)
    model = cfg.model or default_model()
    key = cfg.api_key or "loadtest-" + os.urandom(6).hex()
    if cfg.spawn:
        port = free_port()
        log_path = workdir / "server.log"
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                                     "--model", model, "--api-key", key], cwd=str(ROOT), env=env,
                                    stdout=logf, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

        try:
            wait_healthy(url, 180, proc)
        except Exception:
            stop()
            raise
        return Target(url, key, proc.pid, False, cfg.context_limit, stop=stop, log_path=str(log_path),
                      model_id=Path(model).name)
    from autoglm_app.server import create_app, load_engine, serve_in_thread

    settings = Settings(model=model, api_key=key, served_model_names=[])
    engine = load_engine(settings)
    counter = ErrorLogCounter()
    logging.getLogger().addHandler(counter)
    running = serve_in_thread(create_app(engine, settings))
    # uvicorn's loggers do not propagate to the root logger (and its config replaces their handlers
    # when the server starts), so "Exception in ASGI application" is only seen from here
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(counter)

    def stop() -> None:
        uvicorn_log.removeHandler(counter)  # shutdown noise after the measurements is not counted
        running.stop()
        engine.close()
        logging.getLogger().removeHandler(counter)

    return Target(running.url, key, os.getpid(), True, settings.context_limit, engine=engine, stop=stop,
                  errors=counter, model_id=engine.info().get("model_id"))


def engine_idle(engine, timeout: float = 20.0) -> bool | None:
    """In-process only: True once the engine has nothing running or waiting (cancelled work freed)."""
    if engine is None or not hasattr(engine, "_waiting"):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if getattr(engine, "_running", None) is None and not getattr(engine, "_waiting", []):
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------- one client


class Budget:
    def __init__(self, limit: int | None, deadline: float):
        self.limit, self.deadline = limit, deadline
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if time.monotonic() >= self.deadline or (self.limit is not None and self.used >= self.limit):
                return False
            self.used += 1
            return True


class Client:
    """One simulated user: an httpx connection pool, a gradio_client session, its own random mix."""

    def __init__(self, index: int, cfg: LoadConfig, target: Target, pool: list[PoolItem], ui: bool):
        import httpx

        self.index, self.cfg, self.target, self.pool = index, cfg, target, pool
        self.rng = random.Random(cfg.seed * 1009 + index)
        self.http = httpx.Client(base_url=target.url, timeout=cfg.request_timeout, trust_env=False)
        self.ui = None
        if ui:
            from gradio_client import Client as GradioClient

            self.ui = GradioClient(target.url, verbose=False, download_files=False, analytics_enabled=False,
                                   httpx_kwargs={"timeout": cfg.request_timeout, "trust_env": False})

    def close(self) -> None:
        self.http.close()
        if self.ui is not None and hasattr(self.ui, "close"):
            try:
                self.ui.close()
            except Exception:  # closing is best effort
                pass

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.target.api_key}"} if self.target.api_key else {}

    def pick(self) -> str:
        cfg, r = self.cfg, self.rng.random()
        if r < cfg.bad:
            return self.rng.choice(self.bad_kinds())
        if r < cfg.bad + cfg.disconnect:
            return self.rng.choice(DISCONNECT_KINDS)
        if self.ui is not None and self.rng.random() < cfg.ui:
            return "ui_chat"
        return "api_json" if self.rng.random() < cfg.json_share else "api_stream"

    def bad_kinds(self) -> list[str]:
        return [k for k in BAD_KINDS if (k != "bad_key" or self.target.api_key) and (k != "ui_empty" or self.ui)]

    def run(self, kind: str) -> Outcome:
        import httpx

        t0 = time.perf_counter()
        try:
            if kind in GOOD_KINDS:
                item = self.rng.choice(self.pool)
                out = getattr(self, kind)(item, t0)
            elif kind in DISCONNECT_KINDS:
                out = self.disconnect(kind, t0)
            else:
                out = self.bad(kind)
        except httpx.TimeoutException as e:
            out = Outcome(kind, "server_error", detail=f"timeout: {type(e).__name__}")
        except (httpx.HTTPError, OSError) as e:
            out = Outcome(kind, "server_error", detail=f"connection: {type(e).__name__}: {e}")
        except Malformed as e:
            out = Outcome(kind, "server_error", detail=f"malformed: {e}")
        out.latency_s = time.perf_counter() - t0
        out.client = self.index
        return out

    # ------------------------------------------------------------------ good requests
    def good_body(self, item: PoolItem, stream: bool) -> dict:
        extra = {"user": f"load-client-{self.index}"} if self.cfg.api_user else {}
        return body_for(item, stream, self.cfg.max_tokens, **extra)

    def api_stream(self, item: PoolItem, t0: float) -> Outcome:
        body = self.good_body(item, True)
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                return classify_refusal("api_stream", resp, resp.read())
            r = read_sse(resp, t0)
        if r.errors:
            return Outcome("api_stream", "server_error", 200, detail=f"error event in a good stream: {r.errors[0]}")
        if not (r.role and r.done and r.finish in ("stop", "length")):
            raise Malformed(f"incomplete stream: role={r.role} finish={r.finish} done={r.done}")
        return self.judge("api_stream", item, r.signature(), r.ttft_s)

    def api_json(self, item: PoolItem, t0: float) -> Outcome:
        resp = self.http.post("/v1/chat/completions", json=self.good_body(item, False), headers=self.headers)
        if resp.status_code != 200:
            return classify_refusal("api_json", resp, resp.content)
        return self.judge("api_json", item, completion_signature(resp))

    def ui_answer(self, item: PoolItem) -> list:
        """/clear, then /chat with the pool item; the assistant side of the history."""
        from gradio_client import handle_file

        self.ui.predict(api_name="/clear")
        files = [handle_file(item.image_path)] if item.image_path else []
        history = self.ui.predict(item.question, files, None, item.thinking, 0.0, 0.9, self.cfg.max_tokens, 0,
                                  api_name="/chat")
        return ui_signature(history)

    def ui_chat(self, item: PoolItem, t0: float) -> Outcome:
        from gradio_client.exceptions import AppError

        try:
            sig = self.ui_answer(item)
        except AppError as e:
            return Outcome("ui_chat", "server_error", detail=f"UI error: {str(e)[:200]}")
        except Exception as e:  # gradio_client wraps transport failures in many types
            return Outcome("ui_chat", "server_error", detail=f"UI failure: {type(e).__name__}: {str(e)[:200]}")
        problem = ui_problem(sig)
        if problem and "busy" in problem.lower():
            return Outcome("ui_chat", "busy", retry_after=1.0, detail=problem[:120])
        if problem:
            return Outcome("ui_chat", "server_error", detail=f"UI answer: {problem[:200]}")
        ok = item.ui_ref is None or sig == item.ui_ref
        return Outcome("ui_chat", "ok_correct" if ok else "ok_mismatch",
                       detail="" if ok else f"pool {item.index}: {sig} != {item.ui_ref}")

    def judge(self, kind: str, item: PoolItem, sig: tuple, ttft: float | None = None) -> Outcome:
        ok = item.api_ref is None or tuple(sig) == tuple(item.api_ref)
        return Outcome(kind, "ok_correct" if ok else "ok_mismatch", 200, ttft_s=ttft,
                       detail="" if ok else f"pool {item.index}: {sig!r} != {item.api_ref!r}")

    # ------------------------------------------------------------------ bad requests
    def bad(self, kind: str) -> Outcome:
        if kind == "ui_empty":
            return self.ui_empty()
        item = self.rng.choice(self.pool)
        headers = dict(self.headers)
        body: dict | None = body_for(item, self.rng.random() < 0.5, self.cfg.max_tokens)
        raw: bytes | None = None
        if kind == "bad_json":
            raw = json.dumps(body).encode()[: self.rng.randint(5, 60)]
        elif kind == "bad_base64":
            body["messages"][0]["content"] = [{"type": "image_url",
                                               "image_url": {"url": "data:image/png;base64,@@not*base64@@"}},
                                              {"type": "text", "text": item.question}]
        elif kind == "bad_part":
            body["messages"][0]["content"] = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                              {"type": "text", "text": item.question}]
        elif kind == "bad_temperature":
            body["temperature"] = self.rng.choice((-1.0, 7.5, 1e9))
        elif kind == "bad_n":
            body["n"] = 2
        elif kind == "bad_max_tokens":
            body["max_tokens"] = self.rng.choice((0, -5))
        elif kind == "bad_long_prompt":
            body = body_for(item, False, self.cfg.max_tokens)
            body["messages"][0]["content"] = "red circle " * (self.target.context_limit // 2 + 200)
        elif kind == "bad_model":
            body["model"] = "no-such-model"
        elif kind == "bad_key":
            headers = {"Authorization": "Bearer wrong-" + os.urandom(4).hex()}
        payload = raw if raw is not None else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
        with self.http.stream("POST", "/v1/chat/completions", content=payload, headers=headers) as resp:
            if resp.status_code != 200:
                return classify_refusal(kind, resp, resp.read())
            if "text/event-stream" in resp.headers.get("content-type", ""):
                # refused only once the engine looked at it (e.g. the context check): an error event is right
                r = read_sse(resp, time.perf_counter())
                if r.errors and all(error_object_ok({"error": e}) for e in r.errors) and r.done:
                    if all(e.get("type") == "invalid_request_error" for e in r.errors):
                        return Outcome(kind, "bad_request_rejected", 200, detail="error event in the stream")
                    return Outcome(kind, "server_error", 200, detail=f"bad request failed in the stream: {r.errors[0]}")
                return Outcome(kind, "bad_request_accepted", 200, detail="streamed an answer")
            resp.read()
        return Outcome(kind, "bad_request_accepted", 200, detail="answered 200")

    def ui_empty(self) -> Outcome:
        from gradio_client.exceptions import AppError

        try:
            self.ui.predict("   ", [], None, True, 0.0, 0.9, self.cfg.max_tokens, 0, api_name="/chat")
        except AppError as e:
            if "Traceback" in str(e):
                return Outcome("ui_empty", "server_error", detail=f"UI error with a traceback: {str(e)[:200]}")
            return Outcome("ui_empty", "bad_request_rejected", detail=str(e)[:80])
        except Exception as e:
            return Outcome("ui_empty", "server_error", detail=f"UI failure: {type(e).__name__}: {str(e)[:200]}")
        return Outcome("ui_empty", "bad_request_accepted", detail="an empty turn was answered")

    # ------------------------------------------------------------------ disconnects
    def disconnect(self, kind: str, t0: float) -> Outcome:
        item = self.rng.choice(self.pool)
        body = body_for(item, True, self.cfg.max_tokens)
        if kind == "disconnect_raw":
            # send the whole request, then hang up without reading a byte
            payload = json.dumps(body).encode()
            u = urlsplit(self.target.url)
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n")
            if self.target.api_key:
                head += f"Authorization: Bearer {self.target.api_key}\r\n"
            with socket.create_connection((u.hostname, u.port or 80), timeout=10) as s:
                s.sendall(head.encode() + b"\r\n" + payload)
                time.sleep(self.rng.uniform(0.0, 0.2))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            return Outcome(kind, "disconnect_done")
        stop = "first_chunk" if kind == "disconnect_first_chunk" else "first_token"
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                return classify_refusal(kind, resp, resp.read())
            r = read_sse(resp, t0, stop=stop)
            # leaving the block closes the connection mid-stream
        if r.errors:
            return Outcome(kind, "server_error", 200, detail=f"error event: {r.errors[0]}")
        return Outcome(kind, "disconnect_done", 200, ttft_s=r.ttft_s)


def completion_signature(resp) -> tuple:
    try:
        obj = resp.json()
        choice = obj["choices"][0]
        msg = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Malformed(f"not a chat.completion: {resp.text[:200]!r}") from None
    if obj.get("object") != "chat.completion" or msg.get("role") != "assistant" \
            or choice.get("finish_reason") not in ("stop", "length") or not isinstance(msg.get("content"), str):
        raise Malformed(f"not a complete chat.completion: {resp.text[:200]!r}")
    return (msg.get("reasoning_content") or "", msg["content"], choice["finish_reason"])


# ----------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def mb(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def warm_up(clients: list[Client], pool: list[PoolItem], cfg: LoadConfig) -> dict:
    """References for every pool item, each request alone; then a short concurrent burst."""
    c = clients[0]
    ui_client = next((x for x in clients if x.ui is not None), None)
    info = {"stream_equals_json": True, "problems": []}
    for item in pool:
        resp = c.http.post("/v1/chat/completions", json=body_for(item, False, cfg.max_tokens), headers=c.headers)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request {item.index} failed: HTTP {resp.status_code} {resp.text[:300]}")
        item.api_ref = completion_signature(resp)
        again = c.api_stream(item, time.perf_counter())  # judged against the reference just taken
        if again.outcome != "ok_correct":
            info["stream_equals_json"] = False
            info["problems"].append(f"pool {item.index}: stream {again.outcome} {again.detail}")
        if ui_client is not None:
            sig = ui_client.ui_answer(item)
            if ui_problem(sig):
                raise RuntimeError(f"warm-up UI request {item.index} failed: {ui_problem(sig)}")
            item.ui_ref = sig
    # the concurrent burst: every client, every good kind, unmeasured
    if cfg.warm_burst > 0:
        def burst(cl: Client) -> None:
            for i in range(cfg.warm_burst):
                kind = GOOD_KINDS[(cl.index + i) % 3]
                if kind == "ui_chat" and cl.ui is None:
                    kind = "api_stream"
                cl.run(kind)

        threads = [threading.Thread(target=burst, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=cfg.request_timeout * (cfg.warm_burst + 1))
    return info


def run_load(cfg: LoadConfig) -> dict:
    """Start (or reach) the server, warm up, run the clients, check the server after; the result as a dict."""
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-load-"))
    t_setup = time.monotonic()
    target = start_target(cfg, workdir)
    clients: list[Client] = []
    try:
        rss_start = target.rss()
        pool = make_pool(cfg.pool, cfg.seed, workdir)
        clients = make_clients(cfg, target, pool)
        warm = warm_up(clients, pool, cfg)
        rss_warm = target.rss()
        setup_s = time.monotonic() - t_setup

        sampler = RSSSampler(None if target.in_process else target.pid)
        if target.in_process or target.pid:
            sampler.start()
        outcomes, t_run, duration = drive(clients, cfg)
        sampler.stop()
        rss_after_run = target.rss()

        post = {"engine_idle": engine_idle(target.engine)}
        try:
            import httpx

            h = httpx.get(target.url + "/health", timeout=10, trust_env=False)
            post["health"] = h.status_code == 200 and h.json().get("status") == "ok"
        except Exception as e:  # the server is gone: that is the finding
            post["health"] = False
            post["health_error"] = f"{type(e).__name__}: {e}"
        final = clients[0].run("api_json") if pool else None
        post["good_request"] = bool(final and final.outcome == "ok_correct")
        if final and final.outcome != "ok_correct":
            post["good_request_detail"] = f"{final.outcome}: {final.detail}"
        if clients[0].ui is not None:
            final_ui = clients[0].run("ui_chat")
            post["good_ui_request"] = final_ui.outcome == "ok_correct"
            if final_ui.outcome != "ok_correct":
                post["good_ui_request_detail"] = f"{final_ui.outcome}: {final_ui.detail}"
        rss_end = target.rss()
        log_errors, log_samples = target.log_errors()
    finally:
        for c in clients:
            c.close()
        if target.stop is not None:
            target.stop()
    return summarise(cfg, target, pool, warm, outcomes, duration, setup_s,
                     {"start": rss_start, "warm": rss_warm, "after_run": rss_after_run, "end": rss_end,
                      "samples": sampler.samples}, post, log_errors, log_samples)


def make_clients(cfg: LoadConfig, target: Target, pool: list[PoolItem]) -> list[Client]:
    """All clients, built in parallel (a gradio_client Client takes about a second to connect)."""
    clients: list[Client | None] = [None] * cfg.clients
    errors: list[BaseException] = []

    def build(i: int) -> None:
        try:
            clients[i] = Client(i, cfg, target, pool, ui=cfg.ui > 0)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors or any(c is None for c in clients):
        for c in clients:
            if c is not None:
                c.close()
        raise RuntimeError(f"could not connect the clients: {errors[:1]}")
    return clients  # type: ignore[return-value]


def all_kinds(clients: list[Client], cfg: LoadConfig) -> list[str]:
    """One of every kind the mix can draw (the first requests of a run, with ``cover``)."""
    good = ["api_stream"] + (["api_json"] if cfg.json_share > 0 else []) + (["ui_chat"] if clients[0].ui else [])
    bad = clients[0].bad_kinds() if cfg.bad > 0 else []
    return good + bad + (list(DISCONNECT_KINDS) if cfg.disconnect > 0 else [])


def drive(clients: list[Client], cfg: LoadConfig) -> tuple[list[Outcome], float, float]:
    """Every client loops until the deadline or the budget; returns (outcomes, start, seconds)."""
    t_run = time.monotonic()
    deadline = t_run + cfg.duration
    budget = Budget(cfg.max_requests, deadline)
    forced = all_kinds(clients, cfg) if cfg.cover else []
    random.Random(cfg.seed).shuffle(forced)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def loop(cl: Client) -> None:
        while True:
            with lock:
                kind = forced.pop() if forced else None
            if not budget.take():
                return
            kind = kind or cl.pick()
            try:
                out = cl.run(kind)
            except Exception as e:  # a bug in the load test, not the server: kept apart
                log.exception("client %d: %s failed in the load test itself", cl.index, kind)
                out = Outcome(kind, "client_error", detail=f"{type(e).__name__}: {e}", client=cl.index)
            out.t = round(time.monotonic() - t_run, 3)
            outcomes.append(out)
            if out.outcome == "busy":
                time.sleep(max(0.0, min(out.retry_after or 1.0, BACKOFF_CAP_S, deadline - time.monotonic())))

    threads = [threading.Thread(target=loop, args=(c,), name=f"load-client-{c.index}") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg.duration + 2 * cfg.request_timeout + 30)
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        log.error("%d client threads still running after the join timeout", stuck)
    return list(outcomes), t_run, time.monotonic() - t_run


def summarise(cfg: LoadConfig, target: Target, pool: list[PoolItem], warm: dict, outcomes: list[Outcome],
              duration: float, setup_s: float, rss: dict, post: dict, log_errors: int, log_samples: list) -> dict:
    import torch

    counts = Counter(o.outcome for o in outcomes)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind][o.outcome] += 1
    ttft = [o.ttft_s for o in outcomes if o.kind == "api_stream" and o.outcome == "ok_correct" and o.ttft_s is not None]
    latency = {k: [o.latency_s for o in outcomes if o.kind == k and o.outcome in ("ok_correct", "ok_mismatch")]
               for k in GOOD_KINDS}
    good = counts["ok_correct"] + counts["ok_mismatch"]
    served = good + counts["bad_request_rejected"] + counts["bad_request_accepted"]
    samples = rss.pop("samples")
    ratio = rss["end"] / rss["warm"] if rss["end"] and rss["warm"] else None
    server_errors = [o for o in outcomes if o.outcome == "server_error"]
    checks = {
        "server_errors_zero": counts["server_error"] == 0,
        "good_requests_answered_correctly": good > 0 and counts["ok_mismatch"] == 0,
        "bad_requests_rejected": counts["bad_request_accepted"] == 0
        and (cfg.bad <= 0 or counts["bad_request_rejected"] > 0),
        "memory_end_within_10pct_of_warm": None if ratio is None else abs(ratio - 1) <= 0.10,
        "after_run_health_and_good_request": bool(post.get("health") and post.get("good_request")
                                                  and post.get("good_ui_request", True)
                                                  and post.get("engine_idle") is not False),
        "no_server_error_logs": log_errors == 0,
        "no_load_test_errors": counts["client_error"] == 0,
    }
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "server": {"url": target.url,
                   "mode": "in-process" if target.in_process else ("spawned" if target.stop else "external"),
                   "pid": target.pid, "model": target.model_id, "api_key_set": bool(target.api_key)},
        "setup_s": round(setup_s, 1),
        "duration_s": round(duration, 1),
        "requests": {"sent": len(outcomes), "served": served, "good": good,
                     "served_per_minute": round(served / duration * 60, 1) if duration else None,
                     "good_per_minute": round(good / duration * 60, 1) if duration else None},
        "outcomes": {k: counts.get(k, 0) for k in (*OUTCOMES, "client_error")},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "server_error_details": Counter(o.detail[:160] for o in server_errors).most_common(20),
        "mismatch_details": [o.detail[:400] for o in outcomes if o.outcome == "ok_mismatch"][:10],
        "ttft_ms": {"n": len(ttft), "p50": ms(percentile(ttft, 0.5)), "p95": ms(percentile(ttft, 0.95)),
                    "max": ms(max(ttft) if ttft else None)},
        "latency_ms": {k: {"n": len(v), "p50": ms(percentile(v, 0.5)), "p95": ms(percentile(v, 0.95))}
                       for k, v in latency.items()},
        "memory": {**{f"rss_{k}_mb": mb(v) for k, v in rss.items()},
                   "rss_peak_mb": mb(max((v for _, v in samples), default=None)),
                   "ratio_end_over_warm": None if ratio is None else round(ratio, 3),
                   "samples_mb": [(t, mb(v)) for t, v in samples[:: max(1, len(samples) // 60)]],
                   "measured": "this process (server and clients)" if target.in_process
                   else ("server process" if target.pid else "not measured (give --pid)")},
        "post_checks": post,
        "server_log_errors": {"count": log_errors, "samples": log_samples, "log": target.log_path},
        "warmup": {**warm, "pool": [{"index": p.index, "task": p.task, "question": p.question,
                                     "image": p.png is not None,
                                     "thinking": p.thinking, "shapesworld_answer": p.truth,
                                     "reference_reasoning": p.api_ref[0] if p.api_ref else None,
                                     "reference_answer": p.api_ref[1] if p.api_ref else None,
                                     "reference_finish": p.api_ref[2] if p.api_ref else None} for p in pool]},
        "acceptance": {**checks, "pass": all(v is not False for v in checks.values())},
    }


def load_table(r: dict) -> str:
    c, m, o, post = r["config"], r["memory"], r["outcomes"], r["post_checks"]
    ratio = m["ratio_end_over_warm"]
    verdict = "n/a" if ratio is None else ("PASS" if abs(ratio - 1) <= 0.10 else "FAIL")
    lines = [
        f"{c['clients']} clients for {r['duration_s']} s (budget {c['max_requests'] or 'none'}), {c['bad']:.0%} bad, "
        f"{c['disconnect']:.0%} disconnects, {c['ui']:.0%} of good via the UI, max_tokens {c['max_tokens']}; "
        f"server {r['server']['mode']} {r['server']['url']} ({r['server']['model']}), {r['machine']['cpus']} CPUs",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests sent | {r['requests']['sent']} |",
        f"| requests served (answered + refused bad) | {r['requests']['served']} "
        f"({r['requests']['served_per_minute']}/min) |",
        f"| good requests answered | {r['requests']['good']} ({r['requests']['good_per_minute']}/min) |",
    ]
    lines += [f"| {k} | {v} |" for k, v in o.items() if v or k in ("ok_correct", "ok_mismatch", "server_error")]
    t = r["ttft_ms"]
    lines.append(f"| TTFT, good API streams (n={t['n']}) | p50 {t['p50']} ms, p95 {t['p95']} ms, max {t['max']} ms |")
    for k, v in r["latency_ms"].items():
        if v["n"]:
            lines.append(f"| latency {k} (n={v['n']}) | p50 {v['p50']} ms, p95 {v['p95']} ms |")
    lines += [
        f"| resident memory ({m['measured']}) | start {m['rss_start_mb']} MB, after warm-up {m['rss_warm_mb']} MB, "
        f"peak {m['rss_peak_mb']} MB, end {m['rss_end_mb']} MB |",
        f"| end / after warm-up | {ratio} → {verdict} (within 10%) |",
        f"| after the run | health {post.get('health')}, good API request {post.get('good_request')}, "
        f"good UI request {post.get('good_ui_request')}, engine idle {post.get('engine_idle')} |",
        f"| server ERROR log lines | {r['server_log_errors']['count']} |",
        "",
        "| kind | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]
    for kind, v in r["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(v.get(k, 0) or "") for k in OUTCOMES) + " |")
    a = r["acceptance"]
    lines += ["", "acceptance: " + ", ".join(f"{k} {'ok' if v else ('n/a' if v is None else 'FAIL')}"
                                             for k, v in a.items() if k != "pass"),
              f"verdict: {'PASS' if a['pass'] else 'FAIL'}"]
    if r["server_error_details"]:
        lines.append("server errors: " + "; ".join(f"{n}× {d}" for d, n in r["server_error_details"][:5]))
    if r["mismatch_details"]:
        lines.append("mismatches: " + "; ".join(r["mismatch_details"][:3]))
    return "\n".join(lines)


def main(args) -> dict:
    """Run from ``bench load``'s parsed arguments: print the table, write the JSON."""
    cfg = LoadConfig(clients=args.clients, duration=args.duration, bad=args.bad, disconnect=args.disconnect, ui=args.ui,
                     max_requests=args.max_requests, seed=args.seed, max_tokens=args.max_tokens, pool=args.pool,
                     warm_burst=args.warm_burst, request_timeout=args.timeout, url=args.url, pid=args.pid,
                     api_key=args.api_key, spawn=args.spawn, model=args.model, context_limit=args.context_limit,
                     api_user=getattr(args, "api_user", False), out=str(args.out))
    if cfg.bad + cfg.disconnect > 1 or min(cfg.bad, cfg.disconnect, cfg.ui) < 0 or cfg.ui > 1:
        raise SystemExit("--bad + --disconnect must be at most 1, and --ui within [0, 1]")
    if cfg.clients < 1 or cfg.duration <= 0 or cfg.duration > 3600:
        raise SystemExit("--clients must be >= 1 and --duration within (0, 3600] seconds")
    result = run_load(cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(load_table(result))
    print(f"\nJSON: {args.out}")
    return result
