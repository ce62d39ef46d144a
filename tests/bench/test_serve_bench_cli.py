"""`splitserve bench serve` typed as vLLM users type it, against the project's router and a demo-model
decode worker: the model comes from /v1/models, and a misconfigured run says what to change."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.config import RouterConfig
from tests.router.conftest import RouterThread
from tests.workers.harness import start_workers, stop_workers

ROOT = Path(__file__).resolve().parents[2]
SERVED = "bench-demo"  # not the old default `demo`: a run that completes took the name from /v1/models
SMALL_LOAD = ["--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "6", "--num-prompts", "6"]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The router's HTTP base URL (no /v1), over one decode worker serving the demo model."""
    (decode,) = start_workers(("decode", "demo"))
    try:
        config = RouterConfig(
            model="demo",
            served_model_name=SERVED,
            port=0,
            grpc_port=0,
            decode_addresses=(decode.address,),
            health_interval_s=0.2,
        )
        router = RouterThread(config)
        try:
            yield router.http
        finally:
            router.stop()
    finally:
        stop_workers([decode])


def bench_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "serve", "--num-warmups", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_vllm_style_invocation_completes_every_request_with_the_listed_model(server, tmp_path):
    result_path = tmp_path / "result.json"
    run = bench_serve(
        "--backend", "vllm", "--base-url", server, "--endpoint", "/v1/completions", *SMALL_LOAD,
        "--json", str(result_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(result_path.read_text())
    assert result["config"]["model"] == SERVED
    assert result["config"]["url"] == f"{server}/v1/completions"
    assert (result["summary"]["completed"], result["summary"]["failed"]) == (6, 0), run.stdout
    assert all(r["output_tokens"] == 6 for r in result["requests"])


def test_chat_backend_with_v1_in_the_base_url(server, tmp_path):
    result_path = tmp_path / "result.json"
    run = bench_serve(
        "--backend", "openai-chat", "--base-url", f"{server}/v1/", *SMALL_LOAD, "--json", str(result_path)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(result_path.read_text())
    assert result["config"]["url"] == f"{server}/v1/chat/completions"
    assert (result["summary"]["completed"], result["summary"]["failed"]) == (6, 0), run.stdout
    # The chat template wraps the prompt: the server's usage, not the dataset's estimate, gives its length.
    assert all(r["prompt_len"] > 24 and r["output_tokens"] == 6 for r in result["requests"])


def test_wrong_endpoint_prints_the_error_and_the_endpoints_to_pass(server):
    run = bench_serve("--base-url", server, "--endpoint", "/completions", *SMALL_LOAD)
    assert run.returncode != 0
    assert "HTTP 404" in run.stderr, run.stderr
    assert "the server has no /completions: pass --endpoint /v1/completions or /v1/chat/completions" in run.stderr


def test_unserved_model_names_the_served_one(server):
    run = bench_serve("--base-url", server, "--model", "demo", *SMALL_LOAD)
    assert run.returncode != 0
    assert f"model 'demo' is not served; the server lists {SERVED}: pass --model {SERVED}" in run.stderr, run.stderr


def test_backend_and_endpoint_that_disagree_are_refused(server):
    run = bench_serve("--backend", "openai-chat", "--base-url", server, "--endpoint", "/v1/completions")
    assert run.returncode != 0
    assert "--backend openai-chat speaks /v1/chat/completions, not --endpoint /v1/completions" in run.stderr
