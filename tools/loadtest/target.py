"""The server under test: reached at a loopback URL, started here in this process, or spawned as
``python app.py``; its resident memory sampled, its error log lines counted."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from autoglm_app.memory import rss_bytes, tree_rss_bytes

from .options import LoadConfig

class RSSSampler(threading.Thread):
    def __init__(self, pid: int | None, every: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            value = tree_rss_bytes(self.pid)  # the server and its engine process
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
        return tree_rss_bytes(self.pid) if self.pid else None

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

    return Target(running.url, key, os.getpid(), True, settings.limits.context_limit, engine=engine, stop=stop,
                  errors=counter, model_id=engine.info().get("model_id"))


def engine_idle(engine, timeout: float = 20.0) -> bool | None:
    """In-process only: True once the engine has nothing running or waiting (cancelled work freed)."""
    if engine is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.idle:
            return True
        time.sleep(0.1)
    return False
