"""Unknown API paths and wrong methods are OpenAI 404 / 405 error objects, with the page mounted at "/"
(the full app, as served) and without it; the page's own routes are unaffected."""

from __future__ import annotations

import httpx
import pytest

from tests.api_helpers import assert_error, assert_serves, serve

UNKNOWN = [("GET", "/v1/nope"), ("POST", "/v1/completions"), ("GET", "/v1/chat/completions/extra"),
           ("DELETE", "/v1/files/abc"), ("GET", "/v1"), ("GET", "/v1/")]
WRONG_METHOD = [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/chat/completions", "POST"),
                ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/autoglm-phone-9b", "GET"),
                ("POST", "/health", "GET")]


@pytest.fixture(scope="module")
def api_only_url(engine):
    running = serve(engine)
    yield running.url
    running.stop()


@pytest.fixture(params=["full app", "api only"])
def url(request, live_server, api_only_url):
    return live_server if request.param == "full app" else api_only_url


@pytest.mark.parametrize("method, path", UNKNOWN)
def test_an_unknown_api_path_is_an_openai_404(url, method, path):
    err = assert_error(httpx.request(method, url + path, timeout=30), 404, "not_found")
    assert err["type"] == "invalid_request_error"
    assert path.rstrip("/") in err["message"] and method in err["message"]


@pytest.mark.parametrize("method, path, allowed", WRONG_METHOD)
def test_a_wrong_method_on_an_api_route_is_an_openai_405_with_allow(url, method, path, allowed):
    r = httpx.request(method, url + path, timeout=30)
    err = assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allowed
    assert f"use {allowed}" in err["message"]


def test_the_api_still_serves_after_404s_and_405s(live_server):
    assert_error(httpx.get(live_server + "/v1/chat/completions", timeout=30), 405)
    assert_serves(live_server)


def test_the_pages_own_routes_and_404s_are_unaffected(live_server):
    page = httpx.get(live_server + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(live_server + "/config", timeout=30).json()["mode"] == "blocks"
    outside = httpx.get(live_server + "/no-such-page", timeout=30)
    assert outside.status_code == 404 and "error" not in outside.json()  # the page's own answer
    assert httpx.get(live_server + "/v1/models", timeout=30).json()["object"] == "list"
    assert httpx.get(live_server + "/health", timeout=30).json() == {"status": "ok"}


def test_the_catch_all_is_not_in_the_schema(live_server):
    paths = httpx.get(live_server + "/v1/openapi.json", timeout=30).json()["paths"]
    assert "/v1/{rest}" not in paths and "/v1" not in paths
    assert "post" in paths["/v1/chat/completions"]
