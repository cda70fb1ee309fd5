"""The measuring part: the server subprocess and its CPU, an API turn, a page turn in Chromium."""

from __future__ import annotations

import base64
import json
import os
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .report import PANELS, model_tab_tokens

log = logging.getLogger("autoglm.page_cost")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu"]
QUESTION_IDS = ("prompt", "send", "clear", "chat")  # the page's ids this benchmark drives
SETTING_IDS = ("thinking", "temperature", "max-tokens")  # inside the Generation settings accordion


class PageChanged(RuntimeError):
    """The page lacks an element this benchmark drives (its ids or structure changed)."""


def process_cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc``, its finished children and its live descendants."""
    t = proc.cpu_times()
    total = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def descendants_cpu_s(exclude: set[int]) -> float:
    """CPU seconds of this process's descendants outside ``exclude`` (the Playwright driver and Chromium)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


@dataclass
class Server:
    """``python app.py`` on loopback, started and stopped by this benchmark."""

    model: str | None
    log_path: Path
    root: Path | None = None  # the tree whose app.py is served (default: this checkout)
    port: int = 0
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        from autoglm_app.config import ROOT
        from autoglm_app.server import free_port

        root = self.root or ROOT
        if not (root / "app.py").exists():
            raise SystemExit(f"no app.py in {root}")
        self.port = free_port()
        cmd = [sys.executable, str(root / "app.py"), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.model:
            cmd += ["--model", self.model]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd + self.extra, cwd=str(root), env=env, stdout=logf,
                                         stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.url}/health was not 200 within {timeout:.0f} s; see {self.log_path}")

    def cpu_s(self) -> float:
        return process_cpu_s(self.ps)

    def finished_requests(self) -> float:
        """The engine's finished requests so far (``vllm:request_success_total``, all finish reasons)."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=5, trust_env=False).text
        return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\}\s+([0-9.eE+]+)", text, re.M))

    def wait_finished(self, before: float, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.finished_requests() >= before + 1:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def load_example(index: int) -> tuple[Path, str]:
    """The image and question of an example of assets/examples/examples.json that has both."""
    from autoglm_app.config import ASSETS

    folder = ASSETS / "examples"
    examples = [e for e in json.loads((folder / "examples.json").read_text()) if e.get("image") and e.get("text")]
    if not examples:
        raise SystemExit("assets/examples/examples.json has no example with an image and a question")
    ex = examples[index % len(examples)]
    return folder / ex["image"], ex["text"]


# ---------------------------------------------------------------------------------------------- API turn
def api_turn(server: Server, image: Path, question: str, max_tokens: int, thinking: bool, timeout: float) -> dict:
    """One streamed API turn, greedy, with focus and routing on; the server's CPU from the send to the end."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="page-cost", timeout=timeout, max_retries=0)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    model = client.models.list().data[0].id
    before = server.finished_requests()
    text, reasoning, usage, chunks, telemetry = [], [], None, 0, 0
    cpu0, t0 = server.cpu_s(), time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0, max_tokens=max_tokens,
        stream_options={"include_usage": True},
        extra_body={"return_focus": True, "return_routing": True, "enable_thinking": thinking})
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            text.append(d.content or "")
            extra = d.model_extra or {}
            reasoning.append(getattr(d, "reasoning_content", None) or extra.get("reasoning_content") or "")
            telemetry += ("focus" in extra) + ("routing" in extra)
    wall, cpu = time.perf_counter() - t0, server.cpu_s() - cpu0
    if usage is None:
        raise RuntimeError("the API stream ended without usage (stream_options.include_usage)")
    return {"cpu_s": cpu, "wall_s": wall, "tokens": usage.completion_tokens, "text": "".join(text),
            "reasoning": "".join(reasoning), "chunks": chunks, "telemetry_fields": telemetry,
            "engine_finished": server.wait_finished(before)}


# ---------------------------------------------------------------------------------------------- page turn
OBSERVER_JS = """(ids) => {
  if (window.__pageCost) window.__pageCost.obs.disconnect();
  const st = {ev: {}, src: null};
  st.obs = new MutationObserver(records => {
    const now = performance.now(), hit = new Set();
    for (const r of records) {
      const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (!el) continue;
      for (const id of ids) if (el.closest('#' + id)) hit.add(id);
    }
    if (hit.has('focus-image')) {  // a new heatmap is a new image source
      const img = document.querySelector('#focus-image img'), src = img ? img.src : null;
      if (src === st.src) hit.delete('focus-image'); else st.src = src;
    }
    for (const id of hit) (st.ev[id] = st.ev[id] || []).push(now);
  });
  st.obs.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
  window.__pageCost = st;
}"""
COLLECT_JS = """() => { const st = window.__pageCost; st.obs.disconnect();
  const out = {}; for (const [id, ts] of Object.entries(st.ev)) out[id] = [ts.length, (ts[ts.length-1] - ts[0]) / 1000];
  return out; }"""
# Gradio marks the running event's output components with the class "generating" while it streams
GENERATING = "() => document.querySelectorAll('.generating').length > 0"
IDLE = "() => document.querySelectorAll('.generating').length === 0"
# A page turn is several chained events (start -> chat stream -> finish, ui/live.py) with a panel timer
# beside them, so "no element generating" must hold for a while, not at one poll between two events.
SETTLED = """() => { const now = performance.now();
  if (!window.__settleObs) {
    window.__settleObs = new MutationObserver(() => { window.__busyAt = performance.now(); });
    const chat = document.querySelector('#chat');
    if (chat) window.__settleObs.observe(chat, {subtree: true, childList: true, characterData: true});
  }
  if (document.querySelectorAll('.generating').length) { window.__busyAt = now; return false; }
  if (!document.querySelectorAll('#chat [data-testid="bot"]').length) return false;
  return now - (window.__busyAt || 0) > 800; }"""


class Page:
    """The Studio page in headless Chromium, set for greedy turns."""

    def __init__(self, url: str, max_tokens: int, thinking: bool, timeout: float, width: int = 1366,
                 height: int = 768):
        from playwright.sync_api import sync_playwright

        if not Path(CHROMIUM).exists():
            raise SystemExit(f"no Chromium at {CHROMIUM}")
        self.timeout_ms = int(timeout * 1000)
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            self.page = self.browser.new_page(viewport={"width": width, "height": height})
            self.page.set_default_timeout(30_000)
            self.page.goto(url)
            self._require(QUESTION_IDS)
            self.page.get_by_text("Generation settings").first.click()
            self._require(SETTING_IDS)
            self._set_number("temperature", 0)
            self._set_number("max-tokens", max_tokens)
            self.page.locator("#thinking input[type=checkbox]").set_checked(thinking)
        except BaseException:
            self.close()
            raise

    def _require(self, ids) -> None:
        for eid in ids:
            try:
                self.page.wait_for_selector(f"#{eid}", state="attached", timeout=20_000)
            except Exception as e:
                raise PageChanged(f"the page has no #{eid} (its element ids changed?): {type(e).__name__}") from e

    def _set_number(self, eid: str, value: float) -> None:
        box = self.page.locator(f"#{eid} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        if float(box.input_value()) != float(value):
            raise PageChanged(f"#{eid} did not take the value {value} (it shows {box.input_value()!r})")

    def _tab(self, name: str) -> None:
        tab = self.page.get_by_role("tab", name=name)
        if tab.count():
            tab.first.click()

    def _idle(self) -> None:
        self.page.wait_for_function(IDLE, polling=20, timeout=self.timeout_ms)

    def _attach(self, image: Path) -> None:
        """The image into the prompt box, as a fresh file each turn (same bytes) so that the file input
        always sees a change; waits for its thumbnail (the upload done), one retry."""
        self._turns = getattr(self, "_turns", 0) + 1
        copy = Path(tempfile.gettempdir()) / f"page-cost-{os.getpid()}-{self._turns}{image.suffix}"
        shutil.copyfile(image, copy)
        self._copies = getattr(self, "_copies", []) + [copy]
        shown = "() => document.querySelector('#prompt img') !== null"
        for attempt in range(2):
            self.page.locator("#prompt input[type=file]").set_input_files(str(copy))
            try:
                self.page.wait_for_function(shown, timeout=min(self.timeout_ms, 60_000))
                return
            except Exception:
                log.warning("the attached image did not show in #prompt (attempt %d)", attempt + 1)
        raise PageChanged("the image attached to #prompt never showed as a thumbnail (#prompt img)")

    def turn(self, server: Server, image: Path, question: str) -> dict:
        pg = self.page
        self._tab("Focus")
        pg.locator("#clear").click()
        self._idle()
        pg.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 0")
        self._attach(image)
        pg.locator("#prompt textarea").fill(question)
        self._idle()  # the upload's own events are over
        pg.evaluate(OBSERVER_JS, list(PANELS))
        before = server.finished_requests()
        exclude = {server.ps.pid} | {c.pid for c in server.ps.children(recursive=True)}
        bcpu0, cpu0, t0 = descendants_cpu_s(exclude), server.cpu_s(), time.perf_counter()
        pg.locator("#send").click()
        # the turn is over when the chat has a reply, no element is generating, and the chat has not
        # changed for 0.8 s (a page turn is several chained events, ui/live.py); that 0.8 s is subtracted
        pg.evaluate("() => { window.__busyAt = performance.now(); window.__settleObs = null; }")
        pg.wait_for_function(SETTLED, polling=20, timeout=self.timeout_ms)
        seen = True
        settle_s = 0.8
        wall, cpu = time.perf_counter() - t0 - settle_s, server.cpu_s() - cpu0
        browser_cpu = descendants_cpu_s(exclude) - bcpu0
        updates = pg.evaluate(COLLECT_JS)
        finished = server.wait_finished(before)
        if not finished:
            raise RuntimeError("the page turn ended but the engine counted no finished request "
                               "(vllm:request_success_total) within 10 s")
        bots = pg.locator('#chat [data-testid="bot"]')
        answer = bots.nth(bots.count() - 1).text_content() if bots.count() else ""
        self._tab("Model")
        try:
            panel = pg.locator("#model-panel").text_content(timeout=10_000) or ""
        except Exception:
            panel = ""
        self._tab("Focus")
        return {"cpu_s": cpu, "wall_s": wall, "browser_cpu_s": browser_cpu, "text": answer.strip(),
                "model_tab_tokens": model_tab_tokens(panel), "updates": updates, "generating_seen": seen,
                "engine_finished": finished}

    def close(self) -> None:
        for copy in getattr(self, "_copies", []):
            copy.unlink(missing_ok=True)
        try:
            if getattr(self, "browser", None) is not None:
                self.browser.close()
        finally:
            self._pw.stop()
