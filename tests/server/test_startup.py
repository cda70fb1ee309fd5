"""Start-up: the server listens at once, says how far the load has got, and hands over to the real app.

While the model loads, ``GET /health`` is 503 with the progress (stage, weights done / total) and
Retry-After, ``/v1/*`` an OpenAI-format 503 error, ``GET /`` a loading page that polls /health; then
the page and the API (``create_app``, Gradio mounted at "/") serve on the same port, with Gradio's
lifespan startup run. A failing load says "failed" with the message, and the command exits 1.
The loader's count is the real one: the demo checkpoint's tensors, as transformers reads them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from autoglm_app.config import DEMO_MODEL, Settings
from autoglm_app.loading.progress import LoadProgress
from autoglm_app.server import StartupApp, create_app, free_port, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def wait_for(predicate, timeout: float = 60.0, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


class SlowLoader:
    """A build() that reports 3 of 10 tensors loaded, then blocks until released."""

    def __init__(self, progress: LoadProgress, make_app=None, error: Exception | None = None):
        self.progress, self.make_app, self.error = progress, make_app, error
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self):
        self.progress.stage("loading weights", unit="tensors")
        self.progress.expect(10)
        self.progress.advance(3)
        self.started.set()
        assert self.release.wait(60)
        if self.error is not None:
            raise self.error
        return self.make_app()


def gradio_blocks(app):
    """The Blocks mounted in the real app (its lifespan startup sets ``is_running``)."""
    for route in app.routes:
        inner = getattr(route, "app", None)
        if hasattr(inner, "get_blocks"):
            return inner.get_blocks()
    raise AssertionError("no Gradio app mounted")


@pytest.fixture
def slow_start(engine):
    progress = LoadProgress("tiny-test-model")
    settings = Settings(model="small", served_model_names=[])
    loader = SlowLoader(progress, lambda: create_app(engine, settings))
    startup = StartupApp(loader, progress)
    running = serve_in_thread(startup)
    assert loader.started.wait(30)
    yield running.url, loader, startup
    loader.release.set()
    running.stop()


def test_health_is_503_with_progress_while_loading_and_200_after(slow_start):
    url, loader, startup = slow_start
    r = health(url)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    body = r.json()
    assert body["status"] == "loading" and body["model"] == "tiny-test-model"
    assert body["progress"] == {"stage": "loading weights", "done": 3, "total": 10, "unit": "tensors"}

    loader.release.set()
    ok = wait_for(lambda: (h := health(url)).status_code == 200 and h)
    assert ok.json() == {"status": "ok"}
    assert startup.progress.status == "ready"


def test_the_api_is_an_openai_503_while_loading(slow_start):
    url, loader, _ = slow_start
    for r in (httpx.get(f"{url}/v1/models", timeout=10),
              httpx.post(f"{url}/v1/chat/completions", json={"model": "x", "messages": []}, timeout=10)):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        error = r.json()["error"]
        assert "the model is loading, retry in a few seconds" in error["message"]
        assert error["type"] == "service_unavailable" and error["code"] == "model_not_ready"
    loader.release.set()
    wait_for(lambda: health(url).status_code == 200)
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_the_page_is_a_loading_page_then_the_gradio_page(slow_start):
    url, loader, startup = slow_start
    r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 503 and r.headers["content-type"].startswith("text/html")
    assert "tiny-test-model" in r.text and 'fetch("health"' in r.text and "progressbar" in r.text
    assert "gradio" not in r.text.lower()

    loader.release.set()
    wait_for(lambda: health(url).status_code == 200)
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    blocks = gradio_blocks(startup.app)
    assert blocks.is_running and not blocks._queue.stopped  # the real app's lifespan startup ran


def test_a_failing_loader_shows_failed_on_health_and_the_api():
    progress = LoadProgress("broken-model")
    failures = []
    loader = SlowLoader(progress, error=FileNotFoundError("no model directory at '/nowhere'"))
    running = serve_in_thread(StartupApp(loader, progress, on_failure=failures.append))
    try:
        assert loader.started.wait(30)
        loader.release.set()
        r = wait_for(lambda: (h := health(running.url)).json()["status"] == "failed" and h)
        assert r.status_code == 503
        assert r.json()["error"] == "FileNotFoundError: no model directory at '/nowhere'"
        assert failures == ["FileNotFoundError: no model directory at '/nowhere'"]
        api = httpx.get(f"{running.url}/v1/models", timeout=10)
        assert api.status_code == 503 and api.json()["error"]["code"] == "model_load_failed"
        assert "/nowhere" in api.json()["error"]["message"]
        page = httpx.get(running.url + "/", timeout=10)
        assert page.status_code == 503 and "broken-model" in page.text  # the loading page (its script shows why)
    finally:
        running.stop()


@pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="no demo checkpoint")
def test_the_loader_counts_the_checkpoints_tensors_as_they_are_read():
    from safetensors import safe_open

    from autoglm_app.loading.checkpoints import load_model

    seen = []

    class Recording(LoadProgress):
        def advance(self, n: int = 1) -> None:
            super().advance(n)
            seen.append(dict(self.snapshot()["progress"]))

    with safe_open(str(DEMO_MODEL / "model.safetensors"), "pt") as f:
        tensors = len(list(f.keys()))
    progress = Recording("autoglm-phone-tiny")
    load_model(str(DEMO_MODEL), quantize="fp32", progress=progress)
    assert {s["stage"] for s in seen} == {"loading weights"}
    assert [s["done"] for s in seen] == list(range(1, tensors + 1))
    assert {s["total"] for s in seen} == {tensors} and seen[-1]["unit"] == "tensors"
    assert progress.snapshot()["progress"]["stage"] == "loading the processor"
    import transformers.core_model_loading as cml

    assert type(cml.tqdm).__name__ == "_tqdm_cls"  # the hook is gone after the load


def start_app(tmp_path, argv: list[str], linger_s: float | None = None) -> tuple[subprocess.Popen, str, Path]:
    """``python app.py ARGV`` on a free port (``cli.FAILED_LINGER_S`` set first when given)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    argv = [*argv, "--port", str(port)]
    if linger_s is None:
        command = [sys.executable, "app.py", *argv]
    else:
        command = [sys.executable, "-c", "import sys; from autoglm_app import cli; "
                   f"cli.FAILED_LINGER_S = {linger_s}; sys.exit(cli.main(sys.argv[1:]))", *argv]
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}", log


def poll_health(proc: subprocess.Popen, url: str, log: Path):
    assert proc.poll() is None, log.read_text()[-3000:]
    try:
        return health(url)
    except httpx.TransportError:
        return None


def test_the_command_shows_a_failed_load_then_exits_1(tmp_path):
    proc, url, log = start_app(tmp_path, ["--model", str(tmp_path / "missing")], linger_s=2.0)
    try:
        r = wait_for(lambda: (h := poll_health(proc, url, log)) is not None and h.json()["status"] == "failed" and h,
                     timeout=120, every=0.1)
        assert r.status_code == 503 and "no model directory" in r.json()["error"]
        assert proc.wait(timeout=30) == 1
        assert "ModelNotFoundError" in log.read_text()  # logged, with the traceback
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_app_py_listens_at_once_and_serves_the_page_when_loaded(tmp_path):
    """The real entry point: /health answers 503 "loading" before the model is ready, then 200 and the page."""
    proc, url, log = start_app(tmp_path, ["--model", "small"])
    statuses = []

    def ready():
        r = poll_health(proc, url, log)
        if r is None:
            return False
        statuses.append(r.json()["status"])
        return r.status_code == 200

    try:
        wait_for(ready, timeout=120, every=0.1)
        assert "loading" in statuses, statuses  # it answered while the model loaded
        assert "gradio" in httpx.get(url + "/", timeout=30).text.lower()
        proc.send_signal(signal.SIGINT)
        # uvicorn shuts down, then re-raises the signal it caught (as `uvicorn.run` always did)
        assert proc.wait(timeout=30) in (0, -signal.SIGINT), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def test_in_chromium_the_loading_page_shows_the_progress_then_becomes_the_studio(slow_start, chromium):
    from playwright.sync_api import expect

    url, loader, _ = slow_start
    page = chromium
    page.goto(url)
    expect(page.locator("#model")).to_have_text("tiny-test-model")
    expect(page.locator("#stage")).to_contain_text("loading weights: 3 / 10 tensors loaded (30 %)")
    assert page.locator("#bar").get_attribute("aria-valuenow") == "30"
    loader.release.set()
    page.wait_for_selector("gradio-app", state="attached", timeout=60_000)
    page.wait_for_selector("#prompt", timeout=60_000)  # the Studio's own page, reloaded in place


def test_in_chromium_a_failed_load_shows_its_message(chromium):
    from playwright.sync_api import expect

    progress = LoadProgress("broken-model")
    loader = SlowLoader(progress, error=RuntimeError("CUDA out of memory while loading layer 7"))
    running = serve_in_thread(StartupApp(loader, progress))
    try:
        chromium.goto(running.url)
        expect(chromium.locator("#stage")).to_contain_text("3 / 10")
        loader.release.set()
        expect(chromium.locator("#error")).to_have_text(
            "Loading failed: RuntimeError: CUDA out of memory while loading layer 7", timeout=15_000)
        assert "failed" in chromium.locator("#bar").get_attribute("class")
    finally:
        running.stop()


def test_app_py_with_the_engine_in_its_own_process_serves_the_api_and_ends_the_child(tmp_path):
    """``--engine-process on``: /health, a streamed answer with focus and routing through the openai SDK, the
    metrics' gauges read from the child, and on Ctrl-C the engine process ends with the server."""
    import base64
    import io

    import psutil
    from openai import OpenAI
    from PIL import Image

    proc, url, log = start_app(tmp_path, ["--model", "small", "--engine-process", "on", "--compile", "off"])
    try:
        wait_for(lambda: (r := poll_health(proc, url, log)) is not None and r.status_code == 200, timeout=180,
                 every=0.2)
        children = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.is_running()]
        assert any("multiprocessing" in " ".join(c.cmdline()) for c in children), [c.cmdline() for c in children]
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                          + base64.b64encode(buf.getvalue()).decode()}}
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Where?"}, image]}],
            max_tokens=6, temperature=0, stream=True, extra_body={"return_focus": True, "return_routing": True})
        deltas = [c.choices[0].delta for c in stream if c.choices]
        assert sum("focus" in (d.model_extra or {}) for d in deltas) == 6
        assert sum("routing" in (d.model_extra or {}) for d in deltas) == 6
        metrics = httpx.get(url + "/metrics", timeout=30).text
        import re

        assert re.search(r"^vllm:num_requests_running\{[^}]*\} 0\.0$", metrics, re.M), metrics[:3000]
        assert re.search(r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} 1\.0$', metrics, re.M)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) in (0, -signal.SIGINT), log.read_text()[-3000:]
        psutil.wait_procs(children, timeout=30)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
