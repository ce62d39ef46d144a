"""/metrics after a known amount of traffic: counters and histogram counts match it exactly."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import processes

PROMPT = list(range(3, 60))  # 57 tokens: above the threshold below, so prefill is remote


@pytest.fixture(scope="module")
def router_url():
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
        yield f"http://127.0.0.1:{port}"


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _sum(samples, name: str, **labels) -> float:
    return sum(
        v
        for (n, labelled), v in samples.items()
        if n == name and all(dict(labelled).get(k) == w for k, w in labels.items())
    )


def test_counters_and_histograms_match_the_traffic(router_url):
    before = _samples(router_url)
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            assert client.post(f"{router_url}/v1/completions", json=body).status_code == 200
        for _ in range(2):
            with client.stream("POST", f"{router_url}/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                assert any(line == "data: [DONE]" for line in response.iter_lines())
        assert client.post(f"{router_url}/v1/completions", json={**body, "temperature": 9}).status_code == 400
    after = _samples(router_url)

    def delta(name: str, **labels) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    deadline = time.monotonic() + 15  # the router polls worker Stats every 0.5 s
    while delta("splitserve_worker_requests_finished_total", role="decode") < 5 and time.monotonic() < deadline:
        time.sleep(0.25)
        after = _samples(router_url)

    assert delta("splitserve_requests_total", endpoint="/v1/completions", status="200") == 5
    assert delta("splitserve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("splitserve_time_to_first_token_seconds_count") == 5
    assert delta("splitserve_e2e_request_latency_seconds_count") == 5
    assert delta("splitserve_time_per_output_token_seconds_count") == 5
    assert delta("splitserve_inter_token_latency_seconds_count") == 5 * 4
    assert delta("splitserve_generation_tokens_total") == 25
    assert delta("splitserve_prompt_tokens_total") == 5 * len(PROMPT)
    assert delta("splitserve_routing_decisions_total") == 5
    assert delta("splitserve_kv_transfer_exposed_seconds_count", transport="grpc") == delta(
        "splitserve_routing_decisions_total", decision="remote_prefill"
    )
    assert _value(after, "splitserve_workers", role="prefill", state="up") == 1
    assert _value(after, "splitserve_workers", role="decode", state="up") == 1
    # the workers' own counters, aggregated by the router from their Stats
    assert delta("splitserve_worker_requests_finished_total", role="decode") == 5
    assert delta("splitserve_worker_generated_tokens_total", role="decode") == 25
    remote = delta("splitserve_routing_decisions_total", decision="remote_prefill")
    assert delta("splitserve_kv_transfers_total", role="prefill", outcome="completed") == remote
    assert delta("splitserve_kv_transfers_total", role="decode", outcome="completed") == remote
    assert (
        delta("splitserve_kv_transfer_bytes_total", role="prefill")
        == delta("splitserve_kv_transfer_bytes_total", role="decode")
        > 0
    )


def test_worker_serves_its_own_metrics():
    process, line = processes.start(
        ["worker", "decode", "--model", "demo", "--port", "0", "--kv-cache-mb", "16", "--metrics-port", "0"],
        "metrics on port",
    )
    with processes.running(process):
        port = int(line.rsplit(" ", 1)[1])
        families = {
            f.name
            for f in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        }
    assert {"splitserve_worker_kv_blocks", "splitserve_worker_sequences", "splitserve_kv_transfers"} <= families
