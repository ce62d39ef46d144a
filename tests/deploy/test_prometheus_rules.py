"""deploy/prometheus/rules.yaml passes Prometheus' own checks and its unit tests (rules.test.yaml), run by promtool
(make test installs it: the Makefile's prometheus target). tests/router/test_grafana_dashboard.py loads the same
rules into a live Prometheus."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from router.metrics import SLO_QUANTILE
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


SLO_ALERTS = {
    "SplitserveTTFTAboveSLO": ("splitserve:time_to_first_token_seconds:p90_5m", "ttft"),
    "SplitserveTPOTAboveSLO": ("splitserve:time_per_output_token_seconds:p90_5m", "tpot"),
}


def _alert(rules: dict, name: str) -> dict:
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return rule


@pytest.mark.parametrize("name", sorted(SLO_ALERTS))
def test_the_slo_alerts_compare_with_the_exported_target(name):
    """The cluster config's planner spec owns the targets; the rules hold no copy of them."""
    p99, slo = SLO_ALERTS[name]
    rule = _alert(yaml.safe_load(RULES.read_text()), name)
    left, right = rule["expr"].split(">", 1)
    assert left.strip() == p99
    assert f'splitserve_slo_target_seconds{{slo="{slo}"}}' in right
    assert not re.search(r"\b\d", right.replace(f'"{slo}"', "")), f"a number in the threshold: {right}"
    assert not re.search(r"\b\d+(\.\d+)? ?m?s\b", rule["annotations"]["summary"]), "a fixed number in the summary"


@pytest.mark.parametrize("name", sorted(SLO_ALERTS))
def test_the_slo_alerts_page_on_the_quantile_the_planner_scales_on(name):
    """--ttft-slo and --tpot-slo are targets for a p90 (SLO_QUANTILE): an alert on the p99 paged for an SLO the
    planner held met, while it shrank the pool."""
    rules = yaml.safe_load(RULES.read_text())
    (recorded,) = [r for g in rules["groups"] for r in g["rules"] if r.get("record") == SLO_ALERTS[name][0]]
    quantile = re.match(r"histogram_quantile\(([0-9.]+),", recorded["expr"])
    assert quantile and float(quantile.group(1)) == SLO_QUANTILE, recorded["expr"]
    assert f"p{round(SLO_QUANTILE * 100)} of" in _alert(rules, name)["annotations"]["summary"]


@pytest.mark.parametrize("threshold", ["0.3", "1", "1.5"])
@pytest.mark.parametrize("name", sorted(SLO_ALERTS))
def test_a_fixed_threshold_fails_the_unit_tests(tmp_path, name, threshold):
    """rules.test.yaml exports two targets: whatever one number replaced the target, some case would fail."""
    rules = yaml.safe_load(RULES.read_text())
    _alert(rules, name)["expr"] = f"{SLO_ALERTS[name][0]} > {threshold}"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "rules.test.yaml").write_text(RULE_TESTS.read_text())
    assert _promtool("test", "rules", str(tmp_path / "rules.test.yaml")).returncode != 0
