"""The ecosystem's load generators against a disaggregated splitserve, as users point them at vLLM: AIPerf
(NVIDIA's, Dynamo's) and guidellm (vLLM's), streaming chat with their synthetic prompts and ``ignore_eos`` to fix
the output length (guidellm also asks for usage on every chunk, vLLM's ``continuous_usage_stats``, and sends its
prompt as content parts). Every request must succeed with the length asked for, and the client's counts must agree
with our /metrics read directly before and after — and, for AIPerf, with its own scrape of /metrics over the run.

Both run from their own venv (``make loadgen``, part of ``make test``; pinned in scripts/loadgen-requirements.txt)
as separate programs; the model directory is a random Llama with a trained BPE tokenizer and a ChatML template,
which they load from the same path to build prompts of a given token length."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer

from router.config import RouterConfig
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import write_model_dir
from tests.router.conftest import RouterThread, metric_sum
from tests.workers.harness import start_workers, stop_workers

ROOT = Path(__file__).resolve().parents[2]
MODEL = "bpe-llama"
REQUESTS, CONCURRENCY = 12, 3
INPUT_TOKENS, OUTPUT_TOKENS = 48, 10


def loadgen_tool(name: str) -> Path:
    path = ROOT / ".venv-loadgen" / "bin" / name
    if not path.exists():
        pytest.fail(f"{name} is not installed at {path}: `make loadgen` (part of `make test`) installs it")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[Path, RouterThread]]:
    """A prefill and a decode worker behind a router that sends every prompt to the prefill worker."""
    model_dir = write_model_dir(tmp_path_factory.mktemp("loadgen") / MODEL)
    vocab = BackendTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    write_checkpoint(
        model_dir, "LlamaForCausalLM", seed=3, vocab_size=vocab, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    prefill, decode = start_workers(("prefill", str(model_dir)), ("decode", str(model_dir)))
    try:
        config = RouterConfig(
            port=0,
            grpc_port=0,
            prefill_addresses=(prefill.address,),
            decode_addresses=(decode.address,),
            local_prefill_threshold=0,  # every prompt is prefilled remotely: the disaggregated path
            health_interval_s=0.2,
            request_timeout_s=60.0,
        )
        router = RouterThread(config)
        try:
            yield model_dir, router
        finally:
            router.stop()
    finally:
        stop_workers([prefill, decode])


def _assert_our_metrics_saw(before: dict, after: dict, prompt_tokens: int, client_ttft_s: float) -> None:
    """REQUESTS remotely prefilled requests of OUTPUT_TOKENS each, ``prompt_tokens`` in all, in the router's counters;
    the router stamps a first token before it writes it to the client, so its TTFT cannot exceed the client's."""

    def delta(name: str, **labels) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("vllm:request_success_total") == REQUESTS
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == REQUESTS * OUTPUT_TOKENS
    assert delta("splitserve_routing_decisions_total", decision="remote_prefill") == REQUESTS
    assert delta("vllm:time_to_first_token_seconds_count") == REQUESTS
    assert 0 < delta("vllm:time_to_first_token_seconds_sum") <= client_ttft_s


def _scraped(export: dict, name: str, stat: str) -> float:
    """One statistic of a metric family in AIPerf's server-metrics export (counters named without ``_total``)."""
    family = export["metrics"].get(name) or export["metrics"][name.removesuffix("_total")]
    return sum(series["stats"][stat] for series in family["series"])


def test_aiperf_runs_against_the_disaggregated_stack_and_its_counts_match_our_metrics(stack, tmp_path):
    model_dir, router = stack
    before = router.metrics()
    command = [
        str(loadgen_tool("aiperf")), "profile",
        "--model", MODEL, "--url", router.http, "--endpoint-type", "chat", "--streaming",
        "--tokenizer", str(model_dir),
        "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(OUTPUT_TOKENS), "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--request-count", str(REQUESTS), "--concurrency", str(CONCURRENCY),
        "--artifact-dir", str(tmp_path / "out"), "--ui-type", "none",
    ]  # fmt: skip
    # Its offline mode rejects a local tokenizer path. Its sockets and shared memory go to TMPDIR: a short one,
    # since a unix socket's path has at most 107 characters. It can fail with exit status 0: the records tell.
    with tempfile.TemporaryDirectory(prefix="aiperf-", dir="/tmp") as scratch:
        env = {**os.environ, "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "TMPDIR": scratch}
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    exported = tmp_path / "out" / "profile_export.jsonl"
    assert run.returncode == 0 and exported.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    after = router.metrics()

    # AIPerf as a client: every request completed, each with the usage our API reported.
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(records) == REQUESTS
    assert not [r["error"] for r in records if r.get("error")]
    metrics = [{name: m["value"] for name, m in r["metrics"].items()} for r in records]
    # ignore_eos honoured. (AIPerf's own count, re-tokenizing the text, differs: a random model's tokens do not
    # round-trip through text.)
    assert {m["usage_completion_tokens"] for m in metrics} == {OUTPUT_TOKENS}
    prompt_tokens = sum(m["usage_prompt_tokens"] for m in metrics)
    assert all(m["usage_prompt_tokens"] > INPUT_TOKENS for m in metrics)  # its prompt inside the chat template
    client_ttft_s = sum(m["time_to_first_token"] for m in metrics) / 1000

    # Our /metrics, read directly: the same requests, tokens and route.
    _assert_our_metrics_saw(before, after, prompt_tokens, client_ttft_s)

    # AIPerf's own scrape of our /metrics over its profiling phase: it parsed them and saw the same run.
    export = json.loads((tmp_path / "out" / "server_metrics_export.json").read_text())
    assert export["summary"]["endpoints_successful"] == [f"{router.http}/metrics"]
    assert _scraped(export, "vllm:generation_tokens_total", "total") == REQUESTS * OUTPUT_TOKENS
    assert _scraped(export, "vllm:prompt_tokens_total", "total") == prompt_tokens
    assert _scraped(export, "vllm:e2e_request_latency_seconds", "count") == REQUESTS


def test_guidellm_runs_against_the_disaggregated_stack_and_its_counts_match_our_metrics(stack, tmp_path):
    model_dir, router = stack
    before = router.metrics()
    report = tmp_path / "guidellm.json"
    command = [
        str(loadgen_tool("guidellm")), "run",
        f"--backend=kind=openai_http,target={router.http},model={MODEL}",
        f"--profile=kind=concurrent,streams={CONCURRENCY}",
        f"--constraint=kind=max_requests,count={REQUESTS}",
        f"--data=kind=synthetic_text,prompt_tokens={INPUT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        f"--tokenizer=kind=hf_auto,model={model_dir}",
        f"--output=kind=json,path={report}",
        "--disable-console",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the tokenizer is a local directory
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and report.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    after = router.metrics()

    requests = json.loads(report.read_text())["benchmarks"][0]["requests"]
    assert not requests["errored"] and not requests["incomplete"]
    done = requests["successful"]
    assert len(done) == REQUESTS
    bodies = [json.loads(r["request_args"])["body"] for r in done]
    assert all(b["ignore_eos"] and b["stream_options"]["continuous_usage_stats"] for b in bodies)
    assert {r["output_metrics"]["text_tokens"] for r in done} == {OUTPUT_TOKENS}  # the usage we reported
    prompt_tokens = sum(r["input_metrics"]["text_tokens"] for r in done)
    timings = [r["info"]["timings"] for r in done]
    client_ttft_s = sum(t["first_token_iteration"] - t["request_start"] for t in timings)
    _assert_our_metrics_saw(before, after, prompt_tokens, client_ttft_s)
