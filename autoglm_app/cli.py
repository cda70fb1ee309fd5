"""The command line: ``python app.py`` and the ``autoglm-studio`` console script run ``main``.

    autoglm-studio                      # the shipped demo model, http://127.0.0.1:8000
    autoglm-studio --model DIR_OR_HUB_ID --quantize int4 --gpus 0,1 --gpu-memory 24GiB
    autoglm-studio --plan --gpus 0,1 --gpu-memory 24GiB --quantize int4 \
        --model-config assets/configs/autoglm-phone-9b.json
"""

from __future__ import annotations

import logging
import secrets

from .config import parse_settings

log = logging.getLogger("autoglm")


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

    from .server import create_app, load_engine, startup_warnings

    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    log.info("loading %s", settings.model)
    engine = load_engine(settings)
    app = create_app(engine, settings)
    if settings.share:
        from gradio.networking import setup_tunnel

        try:
            url = setup_tunnel("127.0.0.1", settings.port, secrets.token_urlsafe(32), None, None)
            log.info("public share link: %s", url)
        except Exception as e:  # no network, or the share service refused
            log.error("--share failed (%s); the app is still served locally", e)
    log.info("AutoGLM Studio on http://%s:%d  (API: /v1)", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
