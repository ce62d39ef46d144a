"""The offline chart renderer (deploy/tools): Go template semantics, Helm's values handling, and the
plain manifests being exactly what the chart renders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import render_chart
import yaml
from gotemplate import TemplateError, TemplateSet, go_float, json_number

from tests.deploy.conftest import ALL_OPTIONS, CHART, DEPLOY, REPO


def render(source: str, data=None) -> str:
    templates = TemplateSet()
    templates.add("t", source)
    return templates.render("t", data)


# -- Go template semantics ----------------------------------------------------------------------


def test_trim_markers_and_comments():
    assert render("a  {{- 1 -}}  b") == "a1b"
    assert render("a {{ 1 }} b") == "a 1 b"
    assert render("x\n{{- /* gone */ -}}\n  y") == "xy"
    assert render("{{/* only a comment */}}z") == "z"


def test_variables_are_scoped_to_their_block_and_assignable():
    assert render("{{ $v := 1 }}{{ if true }}{{ $v = 2 }}{{ end }}{{ $v }}") == "2"
    with pytest.raises(TemplateError, match="undefined variable"):
        render("{{ if true }}{{ $inner := 1 }}{{ end }}{{ $inner }}")


def test_if_else_if_with_and_range():
    template = "{{ if gt .n 1.0 }}many{{ else if eq .n 1.0 }}one{{ else }}none{{ end }}"
    assert [render(template, {"n": n}) for n in (3.0, 1.0, 0.0)] == ["many", "one", "none"]
    assert render("{{ with .a }}<{{ . }}>{{ else }}-{{ end }}", {"a": ""}) == "-"
    assert render("{{ range $k, $v := .m }}{{ $k }}={{ $v }},{{ end }}", {"m": {"b": 2.0, "a": 1.0}}) == "a=1,b=2,"
    assert render("{{ range $i, $v := .l }}{{ $i }}{{ $v }}{{ else }}empty{{ end }}", {"l": []}) == "empty"
    assert render("{{ range .l }}[{{ . }}]{{ end }}", {"l": ["x", "y"]}) == "[x][y]"


def test_define_include_and_pipelines():
    source = '{{ define "box" }}[{{ .v }}]{{ end }}{{ include "box" (dict "v" "x") | upper | nindent 2 }}'
    assert render(source) == "\n  [X]"
    assert render('{{ "a-b-" | trunc 4 | trimSuffix "-" }}') == "a-b"
    assert render('{{ and 1 0 2 }}|{{ or 0 "" "z" }}|{{ not 0 }}') == "0|z|true"
    assert render('{{ .missing | default "d" }}|{{ .zero | default 5 }}', {"zero": 0.0}) == "d|5"


def test_numbers_print_as_helm_prints_float64_values():
    # Helm reads values through JSON: 1000000 is a float64 and %v prints it 1e+06.
    assert [go_float(v) for v in (1.0, 0.5, 123456.0, 1000000.0, 0.0001, 0.00001)] == [
        "1",
        "0.5",
        "123456",
        "1e+06",
        "0.0001",
        "1e-05",
    ]
    assert [json_number(v) for v in (1000000.0, 0.00001, 1e21, 2)] == ["1000000", "0.00001", "1e+21", "2"]
    assert render("{{ .n }} {{ int .n }} {{ toJson .n }}", {"n": 1000000.0}) == "1e+06 1000000 1000000"


def test_go_refuses_comparing_an_int_literal_with_a_float_value():
    with pytest.raises(TemplateError, match="incompatible types"):
        render("{{ eq .n 1 }}", {"n": 1.0})


def test_quoting_and_serialisation():
    assert render('{{ printf `{"%s": 1}` "p" | quote | quote }}') == r'"\"{\\\"p\\\": 1}\""'
    assert render("{{ toJson .v }}", {"v": {"b": [1.0, "<"], "a": 0.5}}) == '{"a":0.5,"b":[1,"\\u003c"]}'
    assert yaml.safe_load(render("{{ toYaml .v }}", {"v": {"k": [1.0, {"x": "y"}]}})) == {"k": [1, {"x": "y"}]}
    assert render('{{ "hi" | b64enc }} {{ "" | sha256sum | trunc 8 }}') == "aGk= e3b0c442"


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ if 1 }}x", "without {{end}}"),
        ("{{ nosuchfunction 1 }}", 'function "nosuchfunction" not defined'),
        ("{{ .a.b }}", "nil pointer evaluating"),
        ('{{ block "x" . }}{{ end }}', "not supported"),
        ('{{ fail "stop here" }}', "stop here"),
        ('{{ required "need it" .nothing }}', "need it"),
        ('{{ printf "%d" 1.5 }}', "printf"),
    ],
)
def test_errors_name_the_problem(source, message):
    with pytest.raises(TemplateError, match=message):
        render(source, {})


# -- Helm semantics -----------------------------------------------------------------------------


def test_values_merge_like_helm():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert render_chart.deep_merge(base, {"a": {"c": [3]}, "d": None}) == {"a": {"b": 1, "c": [3]}}


def test_values_are_checked_against_the_chart_schema():
    with pytest.raises(render_chart.ChartError, match="prefil"):
        render_chart.render(CHART, overrides={"prefil": {"replicas": 2}})
    with pytest.raises(render_chart.ChartError, match="gpusPerWorker"):
        render_chart.render(CHART, overrides={"prefill": {"gpusPerWorker": 2}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"decode": {"replicas": 9}}, "decode: need minReplicas <= replicas <= maxReplicas, got 1, 9, 4"),
        ({"model": {"device": "cuda"}}, "model.device cuda needs gpusPerWorker >= 1"),
        ({"decode": {"rayResource": "prefill_node"}}, "must differ"),
        ({"apiKeys": {"create": True}}, "at least one key"),
        ({"decode": {"minReplicas": 0, "replicas": 0}}, "decode: minReplicas must be at least 1"),
    ],
)
def test_chart_refuses_inconsistent_values(overrides, message):
    with pytest.raises(render_chart.ChartError, match=message):
        render_chart.render(CHART, overrides=overrides)


def test_documents_come_in_helm_install_order():
    kinds = [r.kind for r in render_chart.render(CHART, overrides=ALL_OPTIONS)]
    assert kinds == ["Secret", "ConfigMap", "Service", "PodMonitor", "RayCluster"]


def test_notes_render():
    notes = render_chart.render(CHART, notes=True)[0].text
    assert "port-forward svc/splitserve 8000:8000 50051:50051" in notes
    assert "WARNING: no API keys" in notes


def test_cli_renders_the_gpu_values(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "tools" / "render_chart.py"),
            str(CHART),
            "-f",
            str(CHART / "values-gpu.yaml"),
            "--set-json",
            "decode.maxReplicas=16",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    raycluster = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayCluster"][0]
    assert [g["maxReplicas"] for g in raycluster["spec"]["workerGroupSpecs"]] == [8, 16]
    bad = subprocess.run(
        [sys.executable, str(DEPLOY / "tools" / "render_chart.py"), "--set-json", 'transport="tcp"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "transport" in bad.stderr


@pytest.mark.parametrize("path", sorted(render_chart.MANIFESTS), ids=lambda p: p.name)
def test_plain_manifests_are_the_chart_rendered(path):
    assert path.read_text() == render_chart.manifest_text(path), (
        f"{path.relative_to(REPO)} differs from the chart: run `python deploy/tools/render_chart.py --update-manifests`"
    )
