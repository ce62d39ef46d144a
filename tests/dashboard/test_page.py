"""The dashboard page in a real browser against real routers without a control plane: it shows nothing until
given the admin token, its charts open on the router's recent history, and SLO lines appear only when SLOs are set.
"""

from __future__ import annotations

import time

import httpx
import pytest

from router.admin import install_admin
from router.config import RouterConfig
from router.dashboard import SLOTargets, install_dashboard
from router.frontend import Frontend
from router.openai_api import create_app
from router.workers import WorkerPool
from tests.asgi_server import serve_app
from tests.dashboard.conftest import PageProblems, give_token
from tests.router.conftest import RouterThread

API_KEY = "sk-page-key"
ADMIN_TOKEN = "page-admin-token"
HISTORY_AT_LEAST = 6  # snapshots the router took before any page watched
UI_TIMEOUT_MS = 15_000
CHARTS_READY = "() => window.splitserve.charts !== null && window.splitserve.historyLoaded"


@pytest.fixture(scope="module")
def router():
    config = RouterConfig(
        model="demo",
        decode_addresses=("127.0.0.1:9",),
        port=0,
        grpc_port=0,
        api_keys=(API_KEY,),
        admin_token=ADMIN_TOKEN,
    )
    router = RouterThread(config, ready=False)
    yield router
    router.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.problems = PageProblems(page)
    yield page
    context.close()


def history(router) -> list[dict]:
    reply = httpx.get(f"{router.http}/dashboard/api/history", headers={"X-Admin-Token": ADMIN_TOKEN}, timeout=10)
    return reply.json()["points"]


def test_the_page_shows_nothing_until_given_the_admin_token(page, router):
    page.goto(f"{router.http}/dashboard")
    banner = page.locator("#token-needed")
    banner.wait_for()
    assert "admin token" in banner.inner_text()
    assert page.locator("#connection").inner_text() == "no admin token"
    time.sleep(1.5)  # a snapshot a second would have arrived by now
    assert page.evaluate("() => window.splitserve.snapshot") is None
    assert page.locator("#pools .pool").count() == 0
    give_token(page, "not-the-token")
    page.locator("#token-needed", has_text="refused").wait_for()
    assert page.evaluate("() => window.splitserve.snapshot") is None
    assert page.problems.messages == [
        "console: Failed to load resource: the server responded with a status of 403 (Forbidden)"
    ]
    page.problems.messages.clear()
    give_token(page, ADMIN_TOKEN)
    page.locator("#connection.pill-on").wait_for()
    page.locator("#pool-decode").wait_for()
    assert page.locator("#token-needed").is_hidden()
    assert page.problems.messages == []


def test_a_router_without_admin_auth_shows_its_cluster_without_asking_for_a_token(page):
    """Its data is open (router/admin.py): the page asked for a token anyway, then took any string."""
    config = RouterConfig(model="demo", decode_addresses=("127.0.0.1:9",), port=0, grpc_port=0)
    open_router = RouterThread(config, ready=False)
    try:
        page.goto(f"{open_router.http}/dashboard")
        page.locator("#connection.pill-on").wait_for()
        page.locator("#pool-decode").wait_for()
        assert page.locator("#token-needed").is_hidden()
        assert page.problems.messages == []
    finally:
        open_router.stop()


def test_charts_open_on_recent_history(page, router):
    deadline = time.monotonic() + 30
    while len(history(router)) < HISTORY_AT_LEAST:  # the router samples whether or not a page watches
        assert time.monotonic() < deadline, "the router keeps no history"
        time.sleep(0.5)
    page.goto(f"{router.http}/dashboard")
    give_token(page, ADMIN_TOKEN)
    page.wait_for_function(CHARTS_READY)
    labels = page.evaluate("() => window.splitserve.charts.requests.data.labels.length")
    assert labels >= HISTORY_AT_LEAST, f"the charts began with {labels} points, not the router's history"
    first_at = history(router)[0]["at"]
    assert page.evaluate("() => window.splitserve.lastPointAt") >= first_at
    assert page.problems.messages == []


def test_no_slo_lines_when_no_slo_is_set(page, router):
    page.goto(f"{router.http}/dashboard")
    give_token(page, ADMIN_TOKEN)
    page.wait_for_function(CHARTS_READY)
    assert page.evaluate("() => window.splitserve.snapshot.slo") is None
    for chart in ("ttft", "tpot"):
        hidden = page.evaluate(
            f"() => window.splitserve.charts.{chart}.data.datasets.find((d) => d.label === 'SLO').hidden"
        )
        assert hidden is True, f"{chart} draws an SLO line though none is set"
        legend = page.evaluate(f"() => window.splitserve.charts.{chart}.legend.legendItems.map((i) => i.text)")
        assert "SLO" not in legend
    assert page.locator("#figure-slo").is_hidden()


@pytest.fixture(scope="module")
def router_with_slo(tmp_path_factory):
    frontend = Frontend(RouterConfig(model="demo"), WorkerPool())
    app = create_app(frontend, (API_KEY,))
    install_admin(app, frontend, None, ADMIN_TOKEN, (API_KEY,))
    slo = SLOTargets(ttft_s=0.5, tpot_s=0.05)
    install_dashboard(app, frontend, None, slo=slo, admin_token=ADMIN_TOKEN, api_keys=(API_KEY,))
    with serve_app(app) as url:
        yield url


def test_slo_lines_when_slos_are_set(page, router_with_slo):
    page.goto(f"{router_with_slo}/dashboard")
    give_token(page, ADMIN_TOKEN)
    page.wait_for_function(CHARTS_READY)
    page.wait_for_function("() => window.splitserve.charts.ttft.data.labels.length > 0")
    for chart, target_ms in (("ttft", 500), ("tpot", 50)):
        line = page.evaluate(f"() => window.splitserve.charts.{chart}.data.datasets.find((d) => d.label === 'SLO')")
        assert not line.get("hidden") and line["data"][-1] == pytest.approx(target_ms)
        legend = page.evaluate(f"() => window.splitserve.charts.{chart}.legend.legendItems.map((i) => i.text)")
        assert "SLO" in legend
    assert page.locator("#figure-slo").is_visible()
    assert page.problems.messages == []
