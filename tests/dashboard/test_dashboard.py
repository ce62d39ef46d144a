"""The operator dashboard in a real browser against a real cluster (local Ray, demo model):
topology, live charts, and the scale and drain actions behind the admin token.

The tests share one cluster and one page and run in file order: each leaves the page as the next expects.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from cluster.config import PoolSpec
from router.config import RouterConfig
from tests.cluster.harness import local_cluster
from tests.dashboard.conftest import PageProblems, give_token

POOL = PoolSpec(replicas=1, min_replicas=1, max_replicas=3, threads=1, kv_cache_mb=64)
ADMIN_TOKEN = "dashboard-test-admin-token"
UI_TIMEOUT_MS = 20_000
SCREENSHOT = "/tmp/dashboard.png"


@pytest.fixture(scope="module")
def cluster():
    router = RouterConfig(port=0, grpc_port=0, local_prefill_threshold=32, admin_token=ADMIN_TOKEN)
    with local_cluster(8, prefill=POOL, decode=POOL, namespace="splitserve-dashboard-test", router=router) as running:
        yield running


@pytest.fixture(scope="module")
def page(browser, cluster):
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.problems = PageProblems(page)
    page.goto(f"{cluster.url}/dashboard")
    give_token(page, ADMIN_TOKEN)  # the page shows nothing without it
    yield page
    context.close()


def pools(cluster) -> dict:
    return cluster.status()["pools"]


def confirm(page) -> None:
    page.locator("#confirm").wait_for(state="visible")
    page.locator("#confirm-ok").click()
    page.locator("#confirm").wait_for(state="hidden")


def scale_in_ui(page, role: str, replicas: int) -> None:
    page.fill(f"#scale-{role}", str(replicas))
    page.click(f"#pool-{role} .scale-btn")
    confirm(page)


def test_page_loads_and_shows_the_real_workers(page, cluster):
    snapshot = httpx.get(f"{cluster.url}/dashboard/api/snapshot", headers=cluster.admin_headers, timeout=10).json()
    assert snapshot["chart_library"], "the chart library is not installed: npm ci --prefix router/dashboard_web"
    workers = cluster.status()["workers"]
    assert {w["role"] for w in workers} == {"prefill", "decode"}
    for worker in workers:
        # The first event may be a snapshot from just before the workers were ready: wait for the next.
        page.locator(f'.worker[data-worker-id="{worker["worker_id"]}"]', has_text=worker["address"]).wait_for()
    page.locator("#connection.pill-on").wait_for()
    page.wait_for_function("() => window.splitserve.charts !== null")
    assert page.locator("#pool-prefill .desired").inner_text() == "1"
    assert page.problems.messages == []


def test_charts_update_after_traffic(page, cluster):
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", timeout=60, max_retries=0)
    for index in range(6):
        reply = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"dashboard request {index} " * 8}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="too long", max_tokens=10**6)
    has_points = (
        "(name, index) => window.splitserve.charts[name].data.datasets[index].data.some((v) => v !== null && v > 0)"
    )
    for name in ("requests", "tokens", "ttft", "kv"):  # prompts longer than the local-prefill threshold: KV moves
        page.wait_for_function(f"({has_points})('{name}', 0)")
    page.locator("#routes tr .decision").first.wait_for()
    assert page.locator("#routes .decision").count() >= 1
    page.locator("#errors tr", has_text="maximum context length").wait_for()
    assert page.problems.messages == []


def test_kv_bar_agrees_with_its_text(page, cluster):
    """After traffic the prefix cache holds blocks no request uses: the bar shows used/pool, as its text says."""
    cards = page.locator(".worker")
    assert cards.count() >= 2
    for index in range(cards.count()):
        card = cards.nth(index)
        used, total = (int(n) for n in card.locator(".kv-text").inner_text().split()[1].split("/"))
        filled = card.locator(".kvbar").evaluate(
            "(bar) => [...bar.children].reduce((sum, s) => sum + s.getBoundingClientRect().width, 0)"
            " / bar.getBoundingClientRect().width * 100"
        )
        assert total > 0 and filled == pytest.approx(100 * used / total, abs=0.5), card.inner_text()
    cached = [
        int(cards.nth(i).locator(".kv-text").inner_text().split("· ")[1].split()[0]) for i in range(cards.count())
    ]
    assert max(cached) > 0, "no cached blocks: the check above needs them to mean anything"


def test_action_without_the_admin_token_is_refused_before_the_confirmation(page, cluster):
    page.fill("#admin-token", "")
    page.fill("#scale-prefill", "2")
    page.click("#pool-prefill .scale-btn")
    banner = page.locator('#action-result[data-kind="error"]')
    banner.wait_for()
    assert "admin token" in banner.inner_text()
    assert page.locator("#confirm").is_hidden()  # never asked to confirm what cannot happen
    page.click(".worker .drain-btn >> nth=0")
    assert page.locator("#confirm").is_hidden()
    # ... and the router refuses it too
    refused = httpx.post(f"{cluster.url}/admin/scale", json={"role": "prefill", "replicas": 2}, timeout=10)
    assert refused.status_code == 403 and "admin token" in refused.json()["error"]["message"]
    assert pools(cluster)["prefill"]["desired"] == 1
    assert len(cluster.workers("prefill")) == 1
    assert page.problems.messages == []


def test_no_process_shows_the_admin_token_on_its_command_line(cluster):
    showing = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and ADMIN_TOKEN.encode() in (entry / "cmdline").read_bytes():
                showing.append(entry.name)
        except OSError:
            continue
    assert showing == []


def test_scale_changes_the_pool_and_the_topology(page, cluster):
    page.fill("#admin-token", ADMIN_TOKEN)
    scale_in_ui(page, "prefill", 2)
    page.locator('#action-result[data-kind="ok"]', has_text="prefill pool is now set to 2").wait_for()
    assert pools(cluster)["prefill"]["desired"] == 2
    cluster.wait_for(lambda: len(cluster.workers("prefill")) == 2, timeout_s=90, what="a second ready prefill worker")
    page.locator(".worker-ready .badge-prefill").nth(1).wait_for(timeout=10_000)
    page.wait_for_function("() => document.querySelector('#pool-prefill .ready').textContent === '2'")
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_drain_a_worker(page, cluster):
    victim = cluster.workers("prefill")[-1]["worker_id"]
    page.click(f'.worker[data-worker-id="{victim}"] .drain-btn')
    confirm(page)
    page.locator('#action-result[data-kind="ok"]', has_text=f"{victim} is draining").wait_for()
    cluster.wait_for(
        lambda: victim not in {w["worker_id"] for w in cluster.status()["workers"]},
        timeout_s=60,
        what=f"{victim} to leave",
    )
    assert pools(cluster)["prefill"]["desired"] == 1
    page.locator(f'.worker[data-worker-id="{victim}"]').wait_for(state="detached")
    assert page.problems.messages == []
