"""The command line: ``python app.py`` and the ``autoglm-studio`` console script run ``main``.

    autoglm-studio                      # the shipped demo model, http://127.0.0.1:8000
    autoglm-studio --model DIR_OR_HUB_ID --quantize int4 --gpus 0,1 --gpu-memory 24GiB
    autoglm-studio --plan --gpus 0,1 --gpu-memory 24GiB --quantize int4 \
        --model-config assets/configs/autoglm-phone-9b.json

The server listens at once: while the model loads, /health answers 503 with the progress and / shows a
loading page (``server.StartupApp``); then the page and the API take over on the same port. A load that
fails is logged, shown there for ``FAILED_LINGER_S`` seconds, and the process exits 1 (``exit_failed``).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading

from .config import Settings, parse_settings

log = logging.getLogger("autoglm")

FAILED_LINGER_S = 10.0  # how long a failed load stays on the loading page and /health before the exit


def model_label(settings: Settings) -> str:
    """The model's name for the loading page: the served name, or the checkpoint's folder or hub id."""
    if settings.served_model_names:
        return settings.served_model_names[0]
    path = os.path.expanduser(settings.model)
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else settings.model


def open_share_link(port: int) -> None:
    from gradio.networking import setup_tunnel

    try:
        url = setup_tunnel("127.0.0.1", port, secrets.token_urlsafe(32), None, None)
        log.info("public share link: %s", url)
    except Exception as e:  # no network, or the share service refused
        log.error("--share failed (%s); the app is still served locally", e)


def exit_failed() -> None:
    """The end of a failed start: nothing was started but the loading answers, so the process just ends, with 1."""
    log.error("exiting: the model did not load")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv)
    if settings.plan:
        from .loading.planning import run_plan

        if not settings.model_config:
            log.error("--plan needs --model-config PATH (a model config JSON)")
            return 2
        run_plan(settings.gpus or [0], settings.gpu_memory or "24GiB", settings.quantize or "int4",
                 settings.model_config)
        return 0

    import uvicorn

    from .loading.progress import LoadProgress, reporting
    from .server import StartupApp, create_app, load_compare_engine, load_engine, startup_warnings

    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    progress = LoadProgress(model_label(settings))

    def build():  # on the loading thread, once uvicorn has started
        log.info("loading %s", settings.model)
        with reporting(progress):
            engine = load_engine(settings)
            compare = load_compare_engine(settings, progress)  # None unless compare mode was asked for
        progress.stage("building the page")
        return create_app(engine, settings, compare=compare)

    def on_failure(message: str) -> None:
        log.error("the process exits in %.0f s (the loading page and /health show the failure until then)",
                  FAILED_LINGER_S)
        timer = threading.Timer(FAILED_LINGER_S, exit_failed)
        timer.daemon = True
        timer.start()

    app = StartupApp(build, progress, on_failure=on_failure)
    if settings.share:  # on its own thread: the server listens meanwhile
        threading.Thread(target=open_share_link, args=(settings.port,), name="autoglm-share", daemon=True).start()
    log.info("AutoGLM Studio on http://%s:%d  (API: /v1; a loading page until the model is ready)",
             settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
