"""One server, one port: the Gradio UI at / and the OpenAI-compatible API at /v1.

``load_engine(settings)`` loads the model and starts the engine; ``create_app``
mounts both renderers of its event stream on one FastAPI app; ``serve_in_thread``
runs it with uvicorn in the background (tests, notebooks). ``StartupApp`` is what
the command line serves: it listens at once, answers 503 with the loading progress
(and a loading page at /) while the model loads, then hands every request to the
app ``create_app`` made, on the same port.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from .config import SMALL_MODEL, Settings, default_model

log = logging.getLogger("autoglm")


def load_engine(settings: Settings, progress=None):
    """Load the model the settings name and start an Engine on it, or a RemoteEngine for --backend openai.
    With ``--engine-process on`` the Engine runs in a child process and this returns its ``ProcessEngine``.

    ``progress`` (a ``loading.progress.LoadProgress``; by default the current one of a ``reporting`` block)
    hears the stages and the weights loaded / total (from the child too)."""
    from .loading.progress import current_progress, reporting

    progress = progress or current_progress(settings.model)
    with reporting(progress):
        if settings.engine_process == "on" and settings.backend == "local":
            if settings.compare_model or settings.compare_quantize:
                raise SystemExit("compare mode runs both models' forwards in one process: use --engine-process off")
            from .engine.process import ProcessEngine

            progress.stage("starting the engine process")
            return ProcessEngine(_load_engine, settings, progress)
        return _load_engine(settings, progress)


def _load_engine(settings: Settings, progress):
    progress.stage("importing torch and transformers")
    from .engine.worker import Engine
    from .loading.checkpoints import LoadedModel, load_model

    limits = settings.limits
    asr = None
    if settings.asr_model:
        from .engine.asr import Transcriber

        from .loading.progress import counting_weights

        progress.stage(f"loading the speech-to-text model {settings.asr_model}", unit="tensors")
        with counting_weights(progress):
            asr = Transcriber(settings.asr_model, limits)
    if settings.backend == "openai":
        from .engine.remote import RemoteEngine

        if not settings.base_url:
            raise SystemExit("--backend openai needs --base-url (e.g. http://gpu-host:8000/v1)")
        model = settings.model if settings.model not in (SMALL_MODEL, default_model()) else None
        progress.stage(f"connecting to {settings.base_url}")
        return RemoteEngine(settings.base_url, model=model, api_key=settings.remote_api_key, limits=limits, asr=asr)
    if settings.backend != "local":
        raise SystemExit(f"unknown --backend {settings.backend!r}: use local or openai")
    set_cpu_threads(settings.cpu_threads)
    if settings.model == SMALL_MODEL:
        from .modeling.small import build_small

        progress.stage("building the small random model")
        model, processor = build_small()
        model.config._attn_implementation = settings.attn_implementation
        loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-small-random",
                             quantize="fp32", device_map=None, plan=None)
    else:
        loaded = load_model(settings.model, quantize=settings.quantize, gpus=settings.gpus,
                            gpu_memory=settings.gpu_memory, attn_implementation=settings.attn_implementation,
                            trust_remote_code=settings.trust_remote_code,
                            seed=settings.random_seed)  # it reports to the current progress
    progress.stage("starting the engine")
    return Engine(loaded, limits, transcribe=asr.transcribe if asr is not None else None,
                  max_batch=settings.max_batch, compile=settings.compile, progress=progress)


def compare_settings(settings: Settings) -> Settings | None:
    """Compare mode's second model as settings of its own: ``--compare-model`` (else ``--model``) in
    ``--compare-quantize`` (else ``--quantize``), on the same devices and limits; None when compare mode is off.
    It needs the in-process engine: the teacher-forced metrics run the models' forwards."""
    if not settings.compare_model and not settings.compare_quantize:
        return None
    if settings.backend != "local":
        raise SystemExit("compare mode (--compare-model / --compare-quantize) needs --backend local: its metrics "
                         "run both models' forwards in this process")
    from dataclasses import replace

    return replace(settings, model=settings.compare_model or settings.model,
                   quantize=settings.compare_quantize or settings.quantize, asr_model=None,
                   compare_model=None, compare_quantize=None)


def load_compare_engine(settings: Settings, progress=None):
    """The Engine of compare mode's second model (``compare_settings``), or None when compare mode is off."""
    second = compare_settings(settings)
    if second is None:
        return None
    from .loading.progress import current_progress, reporting

    progress = progress or current_progress(second.model)
    with reporting(progress):
        progress.stage(f"loading the compare model {second.model} ({second.quantize or 'default format'})")
        return _load_engine(second, progress)


def set_cpu_threads(requested: int) -> int:
    """torch's intra-op threads for work on the CPU: ``requested``, or with 0 the physical cores less one
    (at least one), so the web server's event loop and the page's rendering keep a core. Measured on 2
    cores (tools.page_cost): with two threads the demo model's decode cost 28 ms of CPU per token through
    the API (the threads spin at every barrier when a core is busy elsewhere), with one 15 ms, at the
    same speed, and a page turn beside a browser went from 94 to 21 ms per token."""
    import psutil
    import torch

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    threads = requested if requested > 0 else max(1, cores - 1)
    torch.set_num_threads(threads)
    return threads


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1, localhost: reachable from this machine only."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_warnings(settings: Settings) -> list[str]:
    """What an operator should hear before the server opens: exposure without a key, open CORS, remote code."""
    out = []
    exposed = not is_loopback(settings.host) or settings.share
    if exposed and not settings.api_key:
        where = "a public share link" if settings.share else f"{settings.host}:{settings.port}"
        out.append(f"listening on {where} (beyond loopback) without --api-key: anyone who can reach it can use "
                   "the API and the page; set --api-key (AUTOGLM_API_KEY) or --host 127.0.0.1")
    if "*" in settings.cors_origins:
        out.append("--cors-origins '*': any web page a visitor opens can call this API from their browser")
    if exposed and settings.allow_remote_images:
        out.append("--allow-remote-images on a reachable server: clients can make it fetch URLs on its network")
    if settings.trust_remote_code:
        out.append("--trust-remote-code: Python code shipped with the checkpoint will run in this process")
    return out


def create_app(engine, settings: Settings, ui: bool = True, compare=None):
    """``compare``: compare mode's second Engine (``load_compare_engine``); the page then answers each turn
    with both."""
    from fastapi import FastAPI

    from .api.metrics import mount_metrics
    from .api.routes import mount_api

    app = FastAPI(title="AutoGLM Studio", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    if settings.cors_origins:  # closed by default: browsers on other origins get no CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    mount_api(app, engine, settings)
    mount_metrics(app, engine, (settings.served_model_names or [engine.info()["model_id"]])[0])
    if ui:
        from .ui.layout import mount_ui

        app = mount_ui(app, engine, settings, compare=compare)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None) -> RunningServer:
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return RunningServer(f"http://{host}:{port}", server, thread)


# ----------------------------------------------------------------------------- start-up: listening while it loads

RETRY_AFTER = "5"


class StartupApp:
    """The ASGI app served from the first second: the loading answers until ``build()`` has made the real app.

    ``build`` (no arguments; it loads the model and returns ``create_app(...)``) runs on its own daemon thread
    from the server's lifespan startup, so uvicorn listens at once. Until the real app is started, ``/health``
    answers 503 with ``progress.snapshot()`` (status "loading", the stage, weights done / total), ``/v1/*`` and
    the other API paths an OpenAI-format 503 error, ``GET /`` a small page that polls ``/health`` and reloads
    into the real page when it answers 200. When ``build`` returns, this app drives the real app's ASGI
    lifespan startup (Gradio's ``mount_gradio_app`` starts its queue and startup events there), sharing the
    server's lifespan state, and from then forwards every request to it; the server's lifespan shutdown runs
    the real app's shutdown. If ``build`` raises or the real startup fails, the progress says "failed" with
    the message, which /health and the page show, and ``on_failure(message)`` is called on the event loop
    (the command line then stops the server and exits 1).
    """

    def __init__(self, build, progress, on_failure=None, name: str | None = None):
        self.build = build
        self.progress = progress
        self.on_failure = on_failure
        self.name = name or progress.model or "the model"
        self.app = None  # the real app, once its lifespan startup completed
        self._lifespan: _Lifespan | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._serve_lifespan(scope, receive, send)
        app = self.app
        if app is not None:
            return await app(scope, receive, send)
        return await self._while_loading(scope, receive, send)

    # ------------------------------------------------------------------ the server's lifespan
    async def _serve_lifespan(self, scope, receive, send):
        state = scope.get("state")
        state = {} if state is None else state
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._task is None:
                    self._task = asyncio.create_task(self._load(state))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load(self, state: dict) -> None:
        loop = asyncio.get_running_loop()
        built = loop.create_future()

        def settle(result, error):
            if not built.done():
                built.set_exception(error) if error is not None else built.set_result(result)

        def work():
            try:
                result, error = self.build(), None
            except BaseException as e:  # noqa: BLE001  (SystemExit from load_engine included: it is shown)
                result, error = None, e
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the server stopped while the model loaded
                pass

        threading.Thread(target=work, name="autoglm-load", daemon=True).start()
        try:
            app = await built
            self.progress.stage("starting the page")
            lifespan = _Lifespan(app, state)
            await lifespan.startup()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001
            message = str(e) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.name, message, exc_info=not isinstance(e, SystemExit))
            self.progress.fail(message)
            if self.on_failure is not None:
                self.on_failure(message)
            return
        self._lifespan, self.app = lifespan, app
        self.progress.ready()
        log.info("%s is loaded (%.1f s): the page and the API are served", self.name,
                 self.progress.snapshot()["elapsed_s"])

    async def _shutdown(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001  (cancelled, or whatever the cancelled load raised)
                pass
        if self._lifespan is not None:
            try:
                await self._lifespan.shutdown()
            except Exception as e:  # noqa: BLE001
                log.warning("the app's shutdown failed: %s", e)

    # ------------------------------------------------------------------ answers while loading
    async def _while_loading(self, scope, receive, send):
        from starlette.responses import HTMLResponse, JSONResponse

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        if scope["type"] != "http":
            return
        snap = self.progress.snapshot()
        failed = snap["status"] == "failed"
        headers = {"Cache-Control": "no-store", **({} if failed else {"Retry-After": RETRY_AFTER})}
        path = scope.get("path", "/")
        if path == "/health":
            response = JSONResponse(snap, status_code=503, headers=headers)
        elif path == "/" and scope.get("method") in ("GET", "HEAD"):
            response = HTMLResponse(loading_page(self.name), status_code=503, headers=headers)
        else:
            message = (f"the model failed to load: {snap.get('error')}" if failed
                       else "the model is loading, retry in a few seconds (GET /health shows the progress)")
            body = {"error": {"message": message, "type": "service_unavailable", "param": None,
                              "code": "model_load_failed" if failed else "model_not_ready"}}
            response = JSONResponse(body, status_code=503, headers=headers)
        await response(scope, receive, send)


class _Lifespan:
    """Drives an ASGI app's lifespan protocol from outside: the server ran its own on ``StartupApp``."""

    def __init__(self, app, state: dict):
        self.app, self.state = app, state
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._to_app.get, self._from_app.put)
        except Exception as e:  # noqa: BLE001  (Starlette re-raises after sending startup.failed)
            await self._from_app.put({"type": "lifespan.error", "message": f"{type(e).__name__}: {e}"})
        await self._from_app.put({"type": "lifespan.ended"})  # an app without lifespan support returns at once

    async def _expect(self, what: str) -> None:
        message = await self._from_app.get()
        if message["type"] not in (f"lifespan.{what}.complete", "lifespan.ended"):
            raise RuntimeError(message.get("message") or f"the app's lifespan {what} failed")

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._to_app.put({"type": "lifespan.startup"})
        await self._expect("startup")

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._expect("shutdown"), timeout)


def loading_page(name: str) -> str:
    """The page at / while the model loads: it polls /health each second and reloads when it answers 200."""
    return LOADING_PAGE.replace("{name}", html.escape(name))


LOADING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>AutoGLM Studio: loading {name}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:42rem;margin:4rem auto;padding:0 1rem;color:#1f2937}
#bar{height:1rem;background:#e5e7eb;border-radius:.5rem;overflow:hidden}
#fill{height:100%;width:0;background:#f97316;transition:width .3s}
#bar.failed #fill{background:#dc2626;width:100%}
#error{color:#b91c1c;white-space:pre-wrap;overflow-wrap:anywhere}
</style></head>
<body><h1>AutoGLM Studio</h1>
<p>Loading <b id="model">{name}</b>; this page opens the Studio when the model is ready.</p>
<div id="bar" role="progressbar" aria-label="weights loaded" aria-valuemin="0" aria-valuemax="100">
<div id="fill"></div></div>
<p id="stage">starting</p><p id="error" hidden></p>
<noscript>Reload this page when the model has loaded (GET /health answers 200 then).</noscript>
<script>
const $ = (id) => document.getElementById(id);
async function poll() {
  let wait = 1000;
  try {
    const r = await fetch("health", {cache: "no-store"});
    const h = await r.json();
    if (r.ok || h.status === "ok") { location.reload(); return; }
    const p = h.progress || {};
    const pct = p.total ? Math.floor(100 * p.done / p.total) : 0;
    $("fill").style.width = pct + "%";
    $("bar").setAttribute("aria-valuenow", pct);
    const count = p.total ? `: ${p.done} / ${p.total} ${p.unit || ""} loaded (${pct} %)` : "";
    $("stage").textContent = `${p.stage || "loading"}${count}, ${h.elapsed_s} s`;
    if (h.status === "failed") {
      $("bar").classList.add("failed");
      $("error").hidden = false;
      $("error").textContent = "Loading failed: " + h.error;
      wait = 5000;
    }
  } catch (e) {
    $("stage").textContent = "the server does not answer; retrying";
    wait = 2000;
  }
  setTimeout(poll, wait);
}
poll();
</script></body></html>
"""
