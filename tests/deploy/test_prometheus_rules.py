"""deploy/prometheus/rules.yaml passes Prometheus' own checks and its unit tests (rules.test.yaml), run by promtool
(make test installs it: the Makefile's prometheus target). tests/router/test_grafana_dashboard.py loads the same
rules into a live Prometheus."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import DEPLOY

RULES = DEPLOY / "prometheus" / "rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing test: {sorted(alerts - tested)}"


def test_promtool_catches_a_broken_rule(tmp_path):
    broken = tmp_path / "rules.yaml"
    broken.write_text(
        RULES.read_text().replace("sum by (namespace, ray_cluster) (", "sum by (namespace, ray_cluster (", 1)
    )
    assert _promtool("check", "rules", str(broken)).returncode != 0
