"""Shared fixtures: a small random AutoGLM model, an engine on it, and a live server on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def small():
    """(model, processor): random weights, fp32, CPU."""
    from autoglm_app.modeling.small import build_small

    return build_small(seed=0)


def make_engine(model, processor, **kwargs):
    from autoglm_app.engine.worker import Engine
    from autoglm_app.loading.checkpoints import LoadedModel

    loaded = LoadedModel(model=model, processor=processor, model_id="autoglm-small-random", quantize="fp32",
                         device_map=None, plan=None)
    return Engine(loaded, **kwargs)


@pytest.fixture(scope="session")
def engine(small):
    eng = make_engine(*small)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def live_server(engine):
    """Base URL of the full app (UI at /, API at /v1) served on 127.0.0.1."""
    from autoglm_app.config import Settings
    from autoglm_app.server import create_app, serve_in_thread

    settings = Settings(model="small", served_model_names=[])
    running = serve_in_thread(create_app(engine, settings))
    yield running.url
    running.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
