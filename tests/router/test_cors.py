"""A web page calling the API from a browser (CORS): only the origins in ``cors_origins`` get the headers a browser
needs, its preflight is answered without an API key (a browser sends none there), and its scripts may read the
request id. Without the setting, no CORS header goes out: browsers keep other pages' scripts from the API."""

from __future__ import annotations

import httpx
import pytest

from router.config import RouterConfig
from tests.router.conftest import SERVED_MODEL

PAGE = "https://chat.example"
KEY = "sk-cors-test"
BODY = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _preflight(url: str, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
    }
    return httpx.options(f"{url}/v1/chat/completions", headers=headers, timeout=10)


def _post(url: str, origin: str) -> httpx.Response:
    headers = {"Origin": origin, "Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers, timeout=60)


def test_a_listed_origin_is_answered_and_others_are_not(make_router, cluster):
    router = make_router(
        cluster.prefills, [cluster.decode], api_keys=(KEY,), cors_origins=f"{PAGE},http://localhost:3000"
    )
    preflight = _preflight(router.http, PAGE)
    assert preflight.status_code == 200, preflight.text  # no API key asked of a preflight
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = _post(router.http, PAGE)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == PAGE
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-credentials" not in answer.headers  # the key is a header, never a cookie
    assert _preflight(router.http, "https://evil.example").status_code == 400
    other = _post(router.http, "https://evil.example")
    assert "access-control-allow-origin" not in other.headers
    unkeyed = httpx.post(f"{router.http}/v1/chat/completions", json=BODY, headers={"Origin": PAGE}, timeout=10)
    assert unkeyed.status_code == 401  # CORS opens nothing the API key guards


def test_without_the_setting_no_cors_header_goes_out(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], api_keys=(KEY,))
    assert "access-control-allow-origin" not in _post(router.http, PAGE).headers
    assert "access-control-allow-origin" not in _preflight(router.http, PAGE).headers


@pytest.mark.parametrize("origins", ["chat.example", "https://chat.example/app", "https://a.example, ftp://b", " , "])
def test_a_malformed_origin_is_refused_naming_the_setting(origins):
    with pytest.raises(ValueError, match="cors_origins"):
        RouterConfig(cors_origins=origins)
