"""deploy/prometheus/scrape-config.yaml under Prometheus itself: promtool accepts it, and a real Prometheus, handed the
head pods of two releases (one with router TLS) as Kubernetes service discovery would list them, keeps exactly their
router ports and scrapes each with the scheme its prometheus.io/scheme annotation names."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from bench.processes import free_port
from tests.deploy.conftest import chart_objects, one
from tests.deploy.test_wiring import SCRAPE_CONFIG, discovered_targets, kuberay_pods

RELEASES = {"plain": {}, "secure": {"tls": {"existingSecret": "router-tls"}}}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def _job_config(directory: Path) -> Path:
    """A prometheus.yml of the scrape job with its pods from a file (targets.json) rather than the Kubernetes API: the
    Debian prometheus and promtool are built without kubernetes_sd, and the relabelling is the job's either way."""
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job |= {"scrape_interval": "1h", "file_sd_configs": [{"files": [str(directory / "targets.json")]}]}
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    return config


def test_promtool_checks_the_scrape_job(tmp_path):
    result = _promtool("check", "config", str(_job_config(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(_job_config(tmp_path).read_text().replace("__scheme__", "__scheme__ oops"))
    assert _promtool("check", "config", str(broken)).returncode != 0, "promtool checks no relabelling here"


def _file_sd_groups() -> list[dict]:
    """Every container port of both releases' pods, each a target group carrying the labels kubernetes_sd gives it."""
    groups = []
    for release, values in RELEASES.items():
        for target in discovered_targets(
            kuberay_pods(one(chart_objects(values=values, release=release), "RayCluster"))
        ):
            address = target.pop("__address__")
            groups.append({"targets": [address], "labels": target})
    return groups


def _prometheus_targets(directory: Path) -> dict:
    """/api/v1/targets of a Prometheus running the scrape job's relabelling over _file_sd_groups()."""
    groups = _file_sd_groups()
    (directory / "targets.json").write_text(json.dumps(groups))
    config = _job_config(directory)
    url = f"http://127.0.0.1:{free_port()}"
    log = directory / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                data = httpx.get(f"{url}/api/v1/targets", params={"state": "any"}, timeout=2).json()["data"]
            except (httpx.TransportError, ValueError, KeyError):  # not up yet
                data = None
            if data and len(data["activeTargets"]) + len(data["droppedTargets"]) == len(groups):
                return data
            time.sleep(0.25)
        raise AssertionError(f"Prometheus listed no targets:\n{log.read_text()[-3000:]}")
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_prometheus_scrapes_each_router_with_its_annotated_scheme(tmp_path):
    data = _prometheus_targets(tmp_path)
    scraped = {t["labels"]["ray_cluster"]: t["scrapeUrl"] for t in data["activeTargets"]}
    assert len(data["activeTargets"]) == len(scraped) == 2, data["activeTargets"]
    assert scraped == {
        "plain-splitserve": "http://10.0.0.1:8000/metrics",
        "secure-splitserve": "https://10.0.0.1:8000/metrics",
    }
