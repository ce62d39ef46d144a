"""deploy/prometheus/rules.yaml passes Prometheus' own checks and its unit tests (rules.test.yaml), run by promtool
(make test installs it: the Makefile's prometheus target). tests/router/test_grafana_dashboard.py loads the same
rules into a live Prometheus."""

from __future__ import annotations

import re
import subprocess

import yaml

from cluster.config import PlannerSpec
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


def test_the_ttft_alert_fires_above_the_planners_default_target():
    (rule,) = [
        r
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "SplitserveTTFTAboveSLO"
    ]
    target = PlannerSpec().ttft_target_s
    threshold = re.fullmatch(r"splitserve:time_to_first_token_seconds:p99_5m > ([0-9.]+)", rule["expr"]).group(1)
    assert float(threshold) == target, "the alert's threshold is the planner's default TTFT target"
    assert f"above the {target:g} s SLO" in rule["annotations"]["summary"]
