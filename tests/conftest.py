"""Shared fixtures: a small random AutoGLM model, an engine on it, and a live server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_engine

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
# every server a test starts decodes eagerly: compiling the decode step costs tens of seconds per start on
# two cores; tests/engine/test_batching.py compiles it once, on purpose
os.environ.setdefault("AUTOGLM_COMPILE", "off")

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def small():
    """(model, processor): random weights, fp32, CPU."""
    from autoglm_app.modeling.small import build_small

    return build_small(seed=0)


@pytest.fixture(scope="session")
def engine(small):
    eng = make_engine(*small)
    yield eng
    eng.close()


@pytest.fixture
def submitted(engine, monkeypatch) -> list:
    """Every RequestHandle the session engine hands out during the test."""
    handles = []
    real = engine.submit

    def spy(request):
        handle = real(request)
        handles.append(handle)
        return handle

    monkeypatch.setattr(engine, "submit", spy)
    return handles


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
