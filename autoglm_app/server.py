"""One server, one port: the Gradio UI at / and the OpenAI-compatible API at /v1.

``load_engine(settings)`` loads the model and starts the engine; ``create_app``
mounts both renderers of its event stream on one FastAPI app; ``serve_in_thread``
runs it with uvicorn in the background (tests, notebooks).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from .config import SMALL_MODEL, Settings, default_model

log = logging.getLogger(__name__)


def load_engine(settings: Settings):
    """Load the model the settings name and start an Engine on it, or a RemoteEngine for --backend openai."""
    from .engine.core import Engine
    from .engine.loading import LoadedModel, load_model

    asr = None
    if settings.asr_model:
        from .engine.asr import Transcriber

        asr = Transcriber(settings.asr_model)
    if settings.backend == "openai":
        from .engine.remote import RemoteEngine

        if not settings.base_url:
            raise SystemExit("--backend openai needs --base-url (e.g. http://gpu-host:8000/v1)")
        model = settings.model if settings.model not in (SMALL_MODEL, default_model()) else None
        return RemoteEngine(settings.base_url, model=model, api_key=settings.remote_api_key,
                            max_queue=settings.max_queue, context_limit=settings.context_limit,
                            max_audio_seconds=settings.max_audio_seconds, asr=asr)
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
                            gpu_memory=settings.gpu_memory, attn_implementation=settings.attn_implementation)
    engine = Engine(loaded, max_queue=settings.max_queue, context_limit=settings.context_limit,
                    max_audio_seconds=settings.max_audio_seconds)
    if asr is not None:
        engine.transcribe = asr.transcribe  # for the UI: recording -> editable transcript
    return engine


def create_app(engine, settings: Settings, ui: bool = True):
    from fastapi import FastAPI

    from .api.routes import mount_api

    app = FastAPI(title="AutoGLM Studio", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    mount_api(app, engine, settings)
    if ui:
        from .ui.app import mount_ui

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
