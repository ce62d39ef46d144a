"""The dashboard of a router with neither a control plane nor the chart library installed:
the page still works, says why there are no charts, and refuses actions."""

from __future__ import annotations

import shutil

import httpx
import pytest

from router.admin import install_admin
from router.config import RouterConfig
from router.dashboard import WEB_DIR, install_dashboard
from router.frontend import Frontend
from router.openai_api import create_app
from router.workers import WorkerPool
from tests.asgi_server import serve_app
from tests.dashboard.conftest import PageProblems, give_token


@pytest.fixture(scope="module")
def bare_router(tmp_path_factory):
    web_dir = tmp_path_factory.mktemp("dashboard_web")  # the page without node_modules
    for name in ("index.html", "app.js", "style.css"):
        shutil.copy(WEB_DIR / name, web_dir / name)
    frontend = Frontend(RouterConfig(model="demo", admin_token="unused"), WorkerPool())
    app = create_app(frontend, api_keys=("secret-key",))
    install_admin(app, frontend, None, frontend.config.admin_token, ("secret-key",))
    install_dashboard(app, frontend, None, web_dir=web_dir, admin_token="unused", api_keys=("secret-key",))
    with serve_app(app) as url:
        yield url


def test_page_explains_missing_charts_and_disables_actions(browser, bare_router):
    page = browser.new_page()
    problems = PageProblems(page)
    try:
        page.goto(f"{bare_router}/dashboard")  # no API key: the dashboard wants the admin token instead
        give_token(page, "unused", problems)
        missing = page.locator("#chart-missing")
        missing.wait_for(timeout=10_000)
        assert "npm ci --prefix router/dashboard_web" in missing.inner_text()
        assert page.locator("#chart-grid").is_hidden()
        page.locator("#nodes", has_text="no workers").wait_for(timeout=10_000)
        assert page.locator("#pool-prefill .scale-btn").is_disabled()
        assert "no control plane" in page.locator("#pool-prefill .bounds").inner_text()
        assert problems.messages == []
    finally:
        page.close()


def test_actions_need_a_control_plane(bare_router):
    reply = httpx.post(
        f"{bare_router}/admin/scale", json={"role": "prefill", "replicas": 2}, headers={"X-Admin-Token": "unused"}
    )
    assert reply.status_code == 501
    assert httpx.post(f"{bare_router}/admin/drain", json={}, headers={"X-Admin-Token": "unused"}).status_code == 501
    assert httpx.get(f"{bare_router}/dashboard/lib/chart.js").status_code == 404
    snapshot = httpx.get(f"{bare_router}/dashboard/api/snapshot", headers={"X-Admin-Token": "unused"}).json()
    assert snapshot["control"] is False and snapshot["chart_library"] is False and snapshot["workers"] == []
    assert httpx.get(f"{bare_router}/v1/models").status_code == 401  # the API itself still wants its key
