"""`helm template` for the splitserve chart, without helm: values merged and checked against
values.schema.json as Helm does, every template rendered by gotemplate.py, documents in Helm's
install order. It also regenerates the plain KubeRay manifests in deploy/kuberay/ from the chart,
so that the two cannot drift:

    python deploy/tools/render_chart.py deploy/helm/splitserve [-f values-gpu.yaml] [--release NAME]
    python deploy/tools/render_chart.py --update-manifests
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gotemplate import TemplateError, TemplateSet  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1]
CHART = DEPLOY / "helm" / "splitserve"
# The plain manifests: file -> values files of the chart it is rendered with (kubectl apply -f).
MANIFESTS = {
    DEPLOY / "kuberay" / "splitserve.yaml": [],
    DEPLOY / "kuberay" / "splitserve-gpu.yaml": [CHART / "values-gpu.yaml"],
}
MANIFEST_RELEASE = "splitserve"
# Helm's install order (releaseutil.InstallOrder) for the kinds a chart like this holds; other
# kinds (custom resources) come after them.
INSTALL_ORDER = [
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicaSet",
    "Deployment",
    "StatefulSet",
    "Job",
    "CronJob",
    "Ingress",
]


@dataclass(frozen=True)
class Rendered:
    source: str  # e.g. splitserve/templates/raycluster.yaml
    text: str

    @property
    def kind(self) -> str:
        document = yaml.safe_load(self.text) or {}
        return document.get("kind", "")


class ChartError(Exception):
    pass


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of values: maps merge, anything else replaces, null deletes a key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def as_helm_reads_it(value):
    """Helm reads values through JSON: every number is a float64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): as_helm_reads_it(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_helm_reads_it(v) for v in value]
    raise ChartError(f"unsupported value {value!r} of type {type(value).__name__}")


def load_values(chart: Path, value_files=(), overrides: dict | None = None) -> dict:
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    for path in value_files:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    if overrides:
        values = deep_merge(values, overrides)
    schema_path = chart / "values.schema.json"
    if schema_path.is_file():
        import jsonschema

        schema = json.loads(schema_path.read_text())
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"- {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
            raise ChartError("values don't meet the specifications of the schema(s):\n" + "\n".join(lines))
    return values


def _chart_object(chart: Path) -> dict:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    # Templates see Chart.yaml's keys capitalised (.Chart.Name, .Chart.AppVersion).
    return {key[0].upper() + key[1:]: value for key, value in meta.items()}


def render(
    chart: Path = CHART,
    value_files=(),
    overrides: dict | None = None,
    release: str = "splitserve",
    namespace: str = "default",
    release_service: str = "Helm",
    notes: bool = False,
) -> list[Rendered]:
    chart = Path(chart)
    meta = _chart_object(chart)
    values = load_values(chart, value_files, overrides)
    templates = TemplateSet()
    files = sorted(p for p in (chart / "templates").rglob("*") if p.is_file())
    names = {}
    for path in files:
        name = f"{meta['Name']}/{path.relative_to(chart).as_posix()}"
        names[path] = name
        templates.add(name, path.read_text())
    out = []
    for path in files:
        name = names[path]
        if path.name.startswith("_") or (path.name == "NOTES.txt") != notes:
            continue
        data = {
            "Values": as_helm_reads_it(values),
            "Chart": meta,
            "Release": {
                "Name": release,
                "Namespace": namespace,
                "Service": release_service,
                "IsInstall": True,
                "IsUpgrade": False,
                "Revision": 1,
            },
            "Template": {"Name": name, "BasePath": f"{meta['Name']}/templates"},
        }
        try:
            text = templates.render(name, data)
        except TemplateError as exc:
            raise ChartError(f"execution error at ({exc})") from None
        out += _split_documents(name, text) if not notes else [Rendered(name, text)]
    order = {kind: i for i, kind in enumerate(INSTALL_ORDER)}
    return sorted(out, key=lambda r: (order.get(r.kind, len(order)), r.source)) if not notes else out


def _split_documents(name: str, text: str) -> list[Rendered]:
    documents = []
    for part in ("\n" + text).split("\n---"):
        if not part.strip() or all(not line.strip() or line.lstrip().startswith("#") for line in part.splitlines()):
            continue
        try:
            parsed = yaml.safe_load(part)
        except yaml.YAMLError as exc:
            raise ChartError(f"YAML parse error in {name}: {exc}\n--- rendered ---\n{part}") from None
        if not isinstance(parsed, dict) or "kind" not in parsed or "apiVersion" not in parsed:
            raise ChartError(f"{name}: a rendered document is not a Kubernetes object:\n{part}")
        documents.append(Rendered(name, part.strip("\n")))
    return documents


def manifests(*args, **kwargs) -> list[dict]:
    return [yaml.safe_load(r.text) for r in render(*args, **kwargs)]


def stream(rendered: list[Rendered]) -> str:
    return "".join(f"---\n# Source: {r.source}\n{r.text}\n" for r in rendered)


def manifest_text(path: Path) -> str:
    """The content of one plain manifest file under deploy/kuberay/."""
    values = MANIFESTS[path]
    flags = "".join(f" -f {v.relative_to(DEPLOY.parent)}" for v in values)
    header = (
        "# Generated from the Helm chart deploy/helm/splitserve (release "
        f"{MANIFEST_RELEASE!r}{', ' + ', '.join(v.name for v in values) if values else ', default values'}).\n"
        f"# Do not edit: change the chart, then run `python deploy/tools/render_chart.py --update-manifests`.\n"
        f"# Same as: helm template {MANIFEST_RELEASE} deploy/helm/splitserve{flags}\n"
    )
    return header + stream(render(CHART, values, release=MANIFEST_RELEASE, release_service="kubectl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chart", nargs="?", default=str(CHART))
    parser.add_argument(
        "-f", "--values", action="append", default=[], help="a values file (repeatable; later ones win)"
    )
    parser.add_argument(
        "--set-json", action="append", default=[], metavar="KEY=JSON", help="a value, e.g. prefill.maxReplicas=8"
    )
    parser.add_argument("--release", default="splitserve")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--notes", action="store_true", help="render NOTES.txt instead of the manifests")
    parser.add_argument(
        "--update-manifests", action="store_true", help="regenerate deploy/kuberay/*.yaml from the chart"
    )
    args = parser.parse_args(argv)
    try:
        if args.update_manifests:
            for path in MANIFESTS:
                path.write_text(manifest_text(path))
                print(f"wrote {path.relative_to(DEPLOY.parent)}")
            return 0
        overrides: dict = {}
        for item in args.set_json:
            key, _, raw = item.partition("=")
            node = overrides
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = json.loads(raw)
        rendered = render(Path(args.chart), args.values, overrides, args.release, args.namespace, notes=args.notes)
    except ChartError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(rendered[0].text if args.notes and rendered else stream(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
