"""The typed schema, fuzzed: schemathesis generates requests for every route in /v1/openapi.json against a live
server (page mounted, random small model) and not one may get a 5xx; the server still answers afterwards.

Bounded: a fixed seed, 25 examples per operation, and a 256-token context so no generated request can ask
for a long generation.
"""

from __future__ import annotations

import shutil
import subprocess

import httpx

from autoglm_app.config import Limits, Settings
from autoglm_app.server import create_app, serve_in_thread
from tests.helpers import make_engine


def test_schemathesis_finds_no_server_error_and_the_server_keeps_serving(small, tmp_path):
    exe = shutil.which("schemathesis") or shutil.which("st")
    assert exe, "schemathesis is not installed: pip install -r requirements-test.txt"
    engine = make_engine(*small, context_limit=256)
    running = serve_in_thread(create_app(engine, Settings(model="small", limits=Limits(context_limit=256))))
    try:
        out = subprocess.run([exe, "run", f"{running.url}/v1/openapi.json", "--url", running.url,
                              "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "0",
                              "--workers", "1", "--request-timeout", "60"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert " passed" in out.stdout and "failed" not in out.stdout.split("Test cases:")[-1]
        assert httpx.get(running.url + "/health", timeout=10).status_code == 200
        r = httpx.post(running.url + "/v1/chat/completions", timeout=120, json={
            "model": "autoglm-phone-9b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        running.stop()
        engine.close()
