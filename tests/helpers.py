"""Plain helpers shared by test modules (import them as ``from tests.helpers import ...``)."""

from __future__ import annotations


def make_engine(model, processor, max_batch: int = 0, compile: str = "off", **limits):
    """An Engine on (model, processor); ``max_batch`` / ``compile`` as the settings of those names; other keyword
    arguments are Limits fields (max_queue=1, context_limit=160)."""
    from autoglm_app.config import Limits
    from autoglm_app.engine.worker import Engine
    from autoglm_app.loading.checkpoints import LoadedModel

    loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-small-random", quantize="fp32",
                         device_map=None, plan=None)
    return Engine(loaded, Limits(**limits), max_batch=max_batch, compile=compile)
