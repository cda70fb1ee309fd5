"""One server, one port: the Gradio UI at / and the OpenAI-compatible API at /v1.

``load_engine(settings)`` loads the model and starts the engine; ``create_app``
mounts both renderers of its event stream on one FastAPI app; ``serve_in_thread``
runs it with uvicorn in the background (tests, notebooks).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from .config import SMALL_MODEL, Settings, default_model



def load_engine(settings: Settings):
    """Load the model the settings name and start an Engine on it, or a RemoteEngine for --backend openai."""
    from .engine.worker import Engine
    from .loading.checkpoints import LoadedModel, load_model

    limits = settings.limits
    asr = None
    if settings.asr_model:
        from .engine.asr import Transcriber

        asr = Transcriber(settings.asr_model, limits)
    if settings.backend == "openai":
        from .engine.remote import RemoteEngine

        if not settings.base_url:
            raise SystemExit("--backend openai needs --base-url (e.g. http://gpu-host:8000/v1)")
        model = settings.model if settings.model not in (SMALL_MODEL, default_model()) else None
        return RemoteEngine(settings.base_url, model=model, api_key=settings.remote_api_key, limits=limits, asr=asr)
    if settings.backend != "local":
        raise SystemExit(f"unknown --backend {settings.backend!r}: use local or openai")
    if settings.model == SMALL_MODEL:
        from .modeling.small import build_small

        model, processor = build_small()
        model.config._attn_implementation = settings.attn_implementation
        loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-small-random",
                             quantize="fp32", device_map=None, plan=None)
    else:
        loaded = load_model(settings.model, quantize=settings.quantize, gpus=settings.gpus,
                            gpu_memory=settings.gpu_memory, attn_implementation=settings.attn_implementation,
                            trust_remote_code=settings.trust_remote_code)
    return Engine(loaded, limits, transcribe=asr.transcribe if asr is not None else None)


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


def create_app(engine, settings: Settings, ui: bool = True):
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

        app = mount_ui(app, engine, settings)
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
