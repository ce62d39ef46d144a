"""The Grafana dashboard in deploy/ against a real Prometheus scraping a live router and its live workers: every
panel's query runs (template variables expanded) without error and the key ones return data; the template
variables find their values; the rules in deploy/prometheus load and evaluate. And, without servers: every name
the dashboard and the rules query is one the router exports."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from bench import processes
from router.metrics import RouterMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "splitserve.json"
RULES = DEPLOY / "prometheus" / "rules.yaml"
NAMESPACE, CLUSTER = "test-ns", "test-cluster"
PROMPT = list(range(3, 60))  # 57 tokens: above the threshold below, so prefill is remote
MAY_BE_EMPTY = {"Planner decisions"}  # no planner runs here
_NAME = re.compile(r"\b((?:splitserve_|vllm:)[a-z0-9_]+)")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query."""
    return [(p["title"], t["refId"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def _exported() -> set[str]:
    metrics = RouterMetrics()
    metrics.watch_pool(SimpleNamespace(workers={}))  # families without samples still come with their names
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {m.name + suffix for m in metrics.registry.collect() for suffix in suffixes.get(m.type, ("",))}


def test_every_queried_metric_exists():
    expressions = [expr for _, _, expr in _targets(_dashboard())]
    expressions += [v["definition"] for v in _dashboard()["templating"]["list"] if "definition" in v]
    expressions += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    queried = {name for expr in expressions for name in _NAME.findall(expr)}
    assert queried, "the dashboard queries nothing"
    missing = sorted(queried - _exported())
    assert not missing, f"the dashboard or the rules query metrics nobody exports: {missing}"


def test_every_query_is_scoped_by_the_template_variables():
    variables = {v["name"] for v in _dashboard()["templating"]["list"]}
    assert {"datasource", "namespace", "cluster", "model"} <= variables
    for title, ref, expr in _targets(_dashboard()):
        selectors = re.findall(r"(?:splitserve_|vllm:)[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and all(
            'namespace=~"$namespace"' in s and 'ray_cluster=~"$cluster"' in s for s in selectors
        ), f"{title} {ref}: every selector filters by namespace and cluster: {expr}"


# -- live: a router, its workers and a Prometheus scraping the router ----------------------------------------


class Prometheus:
    def __init__(self, directory: Path, target: str) -> None:
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "splitserve-router",
                            "static_configs": [
                                {"targets": [target], "labels": {"namespace": NAMESPACE, "ray_cluster": CLUSTER}}
                            ],
                        }
                    ],
                }
            )
        )
        self.log = directory / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus to start")

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def label_values(self, label: str, match: str) -> list[str]:
        response = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Prometheus after it scraped the router through a little traffic; the served model's name."""
    decode, decode_address = processes.start_worker(
        "decode", "--model", "demo", "--threads", "1", "--kv-cache-mb", "32"
    )
    prefill, prefill_address = processes.start_worker(
        "prefill", "--model", "demo", "--threads", "1", "--kv-cache-mb", "32"
    )
    port = processes.free_port()
    router = processes.start_router(
        port, processes.free_port(), [prefill_address], [decode_address], "--local-prefill-threshold", "16"
    )
    with processes.running(router, prefill, decode):
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{port}")
        try:
            yield prometheus, _traffic(prometheus, f"http://127.0.0.1:{port}")
        finally:
            prometheus.stop()


def _traffic(prometheus: Prometheus, router: str) -> str:
    """Sends requests once Prometheus has scraped the idle router twice (so rates see them); waits until it sees
    them, the workers' side included. Returns the served model's name."""
    prometheus.wait(lambda: prometheus.scalar('count_over_time(up{job="splitserve-router"}[1m])') >= 2, 60, "scrapes")
    assert prometheus.scalar('up{job="splitserve-router"}') == 1
    model = httpx.get(f"{router}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        for stream in (False, True, False, True):
            with client.stream("POST", f"{router}/v1/completions", json={**body, "stream": stream}) as response:
                assert response.status_code == 200
                response.read()
    prometheus.wait(
        lambda: (
            prometheus.scalar('sum(splitserve_worker_requests_finished_total{role="decode"})') >= 4
            and prometheus.scalar("sum(splitserve_generation_tokens_total)") >= 4 * 8
        ),
        30,
        "Prometheus to see the traffic",
    )
    time.sleep(2)  # two more scrapes: every rate has a sample after the traffic
    return model


def _expanded(expr: str, model: str) -> str:
    for variable, value in (
        ("$__rate_interval", "1m"),
        ("$__range", "5m"),
        ("$namespace", NAMESPACE),
        ("$cluster", CLUSTER),
        ("$model", model),
    ):
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_runs_and_the_key_ones_have_data(scraped):
    prometheus, model = scraped
    empty = []
    for title, ref, expr in _targets(_dashboard()):
        result = prometheus.query(_expanded(expr, model))
        if not result and title not in MAY_BE_EMPTY:
            empty.append(f"{title} {ref}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    ttft_p99 = prometheus.query(_expanded(_targets(_dashboard())[1][2], model))
    assert 0 < float(ttft_p99[0]["value"][1]) < 60


def test_template_variables_find_the_scraped_cluster(scraped):
    prometheus, model = scraped
    found = {}
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        selector, label = match.groups()
        found[variable["name"]] = prometheus.label_values(label, _expanded(selector, model))
    assert found == {"namespace": [NAMESPACE], "cluster": [CLUSTER], "model": [model]}


def test_rules_load_and_evaluate(scraped):
    prometheus, model = scraped
    prometheus.wait(
        lambda: all(
            r["health"] == "ok"
            for g in httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            for r in g["rules"]
        ),
        30,
        "every rule to evaluate",
    )
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"splitserve-recording", "splitserve-alerts"}
    usage = prometheus.query("splitserve:kv_pool_usage:ratio")
    assert {r["metric"]["role"] for r in usage} == {"prefill", "decode"}
    assert all(r["metric"]["namespace"] == NAMESPACE and r["metric"]["model"] == model for r in usage)
    assert prometheus.query("splitserve:time_to_first_token_seconds:p99_5m")
    firing = [a["labels"]["alertname"] for a in prometheus.query("ALERTS") if a["labels"]["alertstate"] == "firing"]
    assert "SplitserveNoReadyDecodeWorker" not in firing
